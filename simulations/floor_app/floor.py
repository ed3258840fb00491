"""A no-op federation: ClientApps that send back what they received, a ServerApp running
Flower's FedAvg over them and writing when each round ended. Its rounds cost only what
Flower's engine costs for that many client executions and bytes."""

import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

client = ClientApp()
server = ServerApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    ended = []

    def round_ended(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        ended.append(time.monotonic())
        return MetricRecord({})

    strategy = FedAvg(fraction_train=float(config["fraction-train"]), fraction_evaluate=0.0,
                      min_available_nodes=int(config["num-clients"]))
    arrays = ArrayRecord([np.zeros(int(config["parameters"]), dtype=np.float32)])
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=int(config["rounds"]),
                   evaluate_fn=round_ended)
    with open(str(config["out-file"]), "w") as out:
        out.write("round,round_seconds\n")
        for r in range(1, len(ended)):
            out.write(f"{r},{ended[r] - ended[r - 1]:.4f}\n")
