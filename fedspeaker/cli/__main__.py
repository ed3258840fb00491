import sys

from fedspeaker.cli.main import main

sys.exit(main())
