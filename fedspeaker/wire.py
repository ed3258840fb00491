"""The client/server contract: every key a fedspeaker message carries, in one place.

Both apps import their keys from here, so a key is renamed (or its meaning changed) in
one file. Flower's own keys (``server-round`` in a train config, ``proximal-mu`` sent
by FedProx) are listed too, since fedspeaker reads them.

Server -> client, train message (``config`` record, Flower's ConfigRecord):

====================  ======  ===================================================
key                   type    meaning
====================  ======  ===================================================
``server-round``      int     the round, counted over the whole run (Flower's key)
``num-rounds``        int     rounds in the whole run
``speakers``          list    the federation's training speakers in label order:
                              label i is speakers[i] (SecAgg+ runs, whose legacy
                              configs hold no lists, send one newline-joined str)
``federation-id``     str     one id per federation, kept on resume; a client keys
                              its privacy ledger file by it
``proximal-mu``       float   FedProx's proximal term (Flower's key; FedProx only)
``step-fraction``     float   share of its local steps the client takes (default 1;
                              set by the straggler scenario in simulation)
====================  ======  ===================================================

Server -> client, evaluate message (``arrays``: the global model; ``config``; ``cohort``:
an ArrayRecord whose ``embeddings`` are impostor embeddings from the server's public
cohort under this model):

====================  ======  ===================================================
``threshold``         float   the model's accept threshold (cosine), set on the cohort
``speakers``          list    as in a train message
====================  ======  ===================================================

Client -> server, evaluate reply (``metrics``): counts, so the server sums them exactly:

====================  ======  ===================================================
``num-examples``      int     held-out recordings scored (0: none on this device)
``id-correct``        int     of those, named right by the model's head
``target-trials``     int     held-out recordings scored against their owner's
                              voiceprint (enrolled on the device from its training
                              recordings)
``false-rejects``     int     of those, scored below the threshold
``impostor-trials``   int     voiceprints scored against cohort embeddings
``false-accepts``     int     of those, scored at or above the threshold
====================  ======  ===================================================

Client -> server, train reply (``arrays`` record: the trained weights, absent when the
client sat out; ``metrics`` record):

==========================  =====  ==============================================
key                         type   meaning
==========================  =====  ==============================================
``num-examples``            int    training utterances used (FedAvg's weight)
``unit-weight``             int    always 1: equal weights for device-level DP
``train-loss``              float  mean training loss of this round
``train-seconds``           float  the whole round on the client, start-up included
``startup-seconds``         float  process start (or message) to features loaded
``fit-seconds``             float  training alone
``peak-rss-mb``             float  the client process's peak resident memory
``epsilon``                 float  sample-level epsilon this run spent so far (DP runs)
``lifetime-epsilon``        float  the device's epsilon over every run ever on its
                                   recordings (its lifetime ledger; DP runs)
``sat-out-for-budget``      int    1: the next round would pass its epsilon budget,
                                   so it sent no weights
==========================  =====  ==============================================

A device whose privacy policy does not accept the run (fedspeaker/privacy/policy.py)
replies with no ``arrays`` and a ``refusal`` record (a ConfigRecord) whose ``reason``
(str) starts with its kind: ``dp-off``, ``unit``, ``delta``, ``clipping``, ``epsilon`` or
``lifetime``, then a colon and the explanation. In a SecAgg+ round it fails instead, with
the same words.

Under class-vectors=own (FedAwS) a train reply also has a ``fedaws`` record (a
ConfigRecord) with ``own-classes`` (list of int): the rows of the head, i.e. the
speakers, this client trained. The server asks a client it has not heard from yet with a
``query.own_classes`` message (``config``: ``speakers``), answered with the same record, and sends
each client only its own rows of the head (the others zero, in train and evaluate
messages). A row a client was not sent starts there from the run's seeded initial head.

Server -> client, ``query.partition`` message (no content), asked once of each node when
a round draws some of the clients: the answer's ``node`` record (a ConfigRecord) has
``partition-id`` (int: the simulated node's partition, -1 on a real device). A
simulation's node ids are new random numbers at every launch; the seeded draw goes by
partition id, so the same seed trains the same simulated clients.

Server -> client, ``query.backend`` message (``arrays``: the global model; ``config``:
``speakers`` and ``federation-id`` as in a train message), sent to every connected node
at round 0 and after the last round: the statistics of the scoring back end
(fedspeaker/model/backend.py), computed with the raw (un-adapted) embeddings of this
node's training recordings under that model. The reply:

======================  ===========  ============================================
``backend`` record      ArrayRecord  ``sum``: the sum of the units' vectors, each of
                                     norm <= 1 (privacy/backend_stats.py), noised on
                                     the device under sample-level DP
``metrics`` record      MetricRecord ``count`` (float: units summed, noised under
                                     sample-level DP); ``epsilon`` (DP runs: the
                                     ledger after this release); ``sat-out-for-budget``
                                     (1: the release would pass its budget; no sum)
``config`` record       ConfigRecord ``fingerprint`` (str: the encoder weights the
                                     sum was computed with; a reply under other
                                     weights is not counted)
======================  ===========  ============================================
"""

from __future__ import annotations

from typing import Any, Mapping

# server -> client (train config)
SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-rounds"
SPEAKERS = "speakers"
FEDERATION_ID = "federation-id"
PROXIMAL_MU = "proximal-mu"
STEP_FRACTION = "step-fraction"

# client -> server (reply records and metrics)
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"
UNIT_WEIGHT = "unit-weight"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
STARTUP_SECONDS = "startup-seconds"
FIT_SECONDS = "fit-seconds"
PEAK_RSS_MB = "peak-rss-mb"
EPSILON = "epsilon"
LIFETIME_EPSILON = "lifetime-epsilon"
SAT_OUT = "sat-out-for-budget"
REFUSAL = "refusal"
REASON = "reason"
FEDAWS = "fedaws"
OWN_CLASSES = "own-classes"

# server -> client queries (Flower's query messages) and their answers
QUERY_OWN_CLASSES = "query.own_classes"  # answered with a FEDAWS record
QUERY_PARTITION = "query.partition"  # answered with a NODE record
NODE = "node"
PARTITION_ID = "partition-id"
QUERY_BACKEND = "query.backend"  # answered with BACKEND (sum), METRICS (count) and CONFIG
BACKEND = "backend"
BACKEND_SUM = "sum"
BACKEND_SCATTER = "scatter"  # backend-whiten: the summed scatter of augmented copies (upper triangle)
BACKEND_COUNT = "count"
FINGERPRINT = "fingerprint"

# server -> client (evaluate) and back
THRESHOLD = "threshold"
COHORT = "cohort"
COHORT_EMBEDDINGS = "embeddings"
ID_CORRECT = "id-correct"
TARGET_TRIALS = "target-trials"
FALSE_REJECTS = "false-rejects"
IMPOSTOR_TRIALS = "impostor-trials"
FALSE_ACCEPTS = "false-accepts"
EVALUATION_COUNTS = (NUM_EXAMPLES, ID_CORRECT, TARGET_TRIALS, FALSE_REJECTS, IMPOSTOR_TRIALS,
                     FALSE_ACCEPTS)


def speakers_from_config(config: Mapping[str, Any]) -> list[str]:
    """The label space a train config carries: a list, or (SecAgg+) one joined string."""
    speakers = config.get(SPEAKERS, [])
    if isinstance(speakers, str):
        return speakers.split("\n") if speakers else []
    return list(speakers)


def sat_out(content: Any) -> bool:
    """Whether a reply's RecordDict comes from a client that stopped for its budget."""
    return any(record.get(SAT_OUT, 0) for record in content.metric_records.values())


def refusal(content: Any) -> str | None:
    """The reason a device refused the run (its privacy policy), or None."""
    record = content.config_records.get(REFUSAL)
    return str(record[REASON]) if record is not None else None


def sent_no_weights(content: Any) -> bool:
    """A reply without weights by design: sat out for budget, or refused by policy."""
    return sat_out(content) or refusal(content) is not None
