"""Training one party's model: the loop, and a client's (or `central`'s) local trainer."""
