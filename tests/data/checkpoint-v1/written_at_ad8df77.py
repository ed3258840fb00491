"""How the checkpoints here were written: by this script, run at commit ad8df77 (before the
checkpoint held explicit state), as `.venv/bin/python written_at_ad8df77.py tests/data/checkpoint-v1`.
Four strategy stacks after 2 rounds, and what round 3 gives from them with that code."""
import sys
from pathlib import Path
import numpy as np, torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
from fedspeaker.config import RunSettings
from server.checkpoint import Checkpoint, strategy_state
from server.strategies import build_strategy, user_epsilon
from server.device_eval import DeviceEvaluation
from tests.conftest import EightNodes

class Nodes(EightNodes):
    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            n = m.metadata.dst_node_id
            if m.metadata.message_type == "query.own_classes":
                out.append(Message(RecordDict({"fedaws": ConfigRecord({"own-classes": [n % 3]})}), reply_to=m))
            else:
                out.append(Message(RecordDict({"node": ConfigRecord({"partition-id": n - 1})}), reply_to=m))
        return out

def run_round(strategy, r, arrays, seed):
    sent = list(strategy.configure_train(r, arrays, ConfigRecord({"speakers": ["a", "b", "c"]}), Nodes()))
    replies = []
    for m in sent:  # in the order Flower's unseeded sampling gave: each node's noise its own
        n = m.metadata.dst_node_id
        rng = np.random.default_rng([seed, n])
        content = {"arrays": ArrayRecord({k: Array((a.numpy() + rng.standard_normal(a.numpy().shape)).astype(np.float32))
                                          for k, a in arrays.items()}),
                   "metrics": MetricRecord({"num-examples": 10 + n, "unit-weight": 1, "train-loss": 1.0})}
        if "head.weight" in arrays:
            content["fedaws"] = ConfigRecord({"own-classes": [n % 3]})
        replies.append(Message(RecordDict(content), reply_to=m))
    new, _ = strategy.aggregate_train(r, replies)
    return new

CASES = {
    "fedadam-device-eval": dict(strategy="fedadam", fraction_evaluate=0.5),
    "fedavg-device-dp-poisson": dict(strategy="fedavg", user_dp="server-fixed", client_sampling="poisson",
                                     fraction_train=0.5),
    "fedavgm-own-class-vectors": dict(strategy="fedavgm", class_vectors="own", dp=False, fraction_train=0.5),
    "fedavg-server-adaptive": dict(strategy="fedavg", user_dp="server-adaptive"),
}
out = Path(sys.argv[1])
expected = {}
for name, kw in CASES.items():
    settings = RunSettings(num_clients=8, **kw)
    def stack():
        s = build_strategy(settings)
        if settings.fraction_evaluate:
            s = DeviceEvaluation(s, cohort=lambda a: (0.5, torch.zeros(1, 2)), on_counts=lambda r, t: None)
        return s
    strategy = stack()
    arrays = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    if "head.weight" in str(kw) or kw.get("class_vectors") == "own":
        arrays = ArrayRecord({"head.weight": Array(np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)),
                              "w": Array(np.zeros(4, np.float32))})
    np.random.seed(1)
    for r in (1, 2):
        arrays = run_round(strategy, r, arrays, seed=r)
    (out / name).mkdir(parents=True, exist_ok=True)
    Checkpoint(round=2, arrays={k: a.numpy().copy() for k, a in arrays.items()}, strategy=strategy_state(strategy),
               rows=[], seconds=1.0, federation_id="f", run_config=settings.to_run_config()).save(out / name)
    np.random.seed(7)
    nxt = run_round(strategy, 3, arrays, seed=3)
    expected[name] = {"arrays": {k: a.numpy().copy() for k, a in nxt.items()}, "user_epsilon": user_epsilon(strategy),
                      "settings": kw}
    print(name, strategy_state(strategy)[0].keys() if strategy_state(strategy) else None)
torch.save(expected, out / "expected.pt")
