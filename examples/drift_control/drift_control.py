"""A SCAFFOLD-like plugin: each client keeps a control variate between its rounds (per-client state), local
steps are corrected by ``c - c_i``, and the server moves ``c`` by the clients' control deltas.

The built-in ``scaffold`` (mllmfl_dist/fl/strategies/scaffold.py) is the paper's algorithm; this is the README's
example of the hooks it uses.
"""

from dataclasses import dataclass

import torch
from torch import nn

from mllmfl_dist.config.fields import positive
from mllmfl_dist.fl.strategies import ClientUpdate, FedAvg, StrategyArgs


@dataclass(frozen=True)
class DriftControlConfig:
    """[drift_control]"""

    control_lr: float = positive(1.0)  # scales the server's step of c along the mean control delta


def width(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class DriftControl(FedAvg):
    name = "drift_control"
    sections = {"drift_control": DriftControlConfig}
    dp_compatible = False  # it uploads control deltas besides the model update

    def __init__(self, args: StrategyArgs, drift_control: DriftControlConfig):
        super().__init__(args)
        self.control_lr = drift_control.control_lr
        self.c = None  # the server's control variate, the same on every rank after each broadcast
        self.correction = []

    def server_control(self, model):
        if self.c is None:
            self.c = torch.zeros(width(model))
        return self.c

    # each client's own tensors, kept by rank 0's store and handed to the client that trains it
    def client_state_shapes(self, model):
        return {"c_i": (width(model),)}

    def upload_shapes(self, model):
        return {"delta_c": (width(model),)}

    def start_client(self, model, client):  # client.state is None before the client's first round
        c = self.server_control(model)
        c_i = client.state["c_i"].cpu() if client.state is not None else torch.zeros_like(c)
        params = [p for p in model.parameters() if p.requires_grad]
        self.correction = [d.view_as(p) for d, p in zip((c - c_i).split([p.numel() for p in params]), params)]

    def local_loss(self, model, logits, labels, global_params, inputs=None):
        params = [p for p in model.parameters() if p.requires_grad]
        drift = sum((p * d).sum() for p, d in zip(params, self.correction))  # its gradient is c - c_i
        return nn.functional.cross_entropy(logits, labels) + drift

    def finish_client(self, model, client, start, trained, trainable_mask):
        c = self.server_control(model).double()
        c_i = client.state["c_i"].double().cpu() if client.state is not None else torch.zeros_like(c)
        if client.local_steps == 0:
            return ClientUpdate({}, {"c_i": c_i})
        new_c_i = c_i - c + (start - trained)[trainable_mask].cpu() / (client.local_steps * self.args.federated.lr)
        return ClientUpdate(uploads={"delta_c": new_c_i - c_i}, state={"c_i": new_c_i})

    def process_uploads(self, model, sums, round_index):  # rank 0, after the server step
        step = self.control_lr * sums["delta_c"].cpu() / self.args.federated.num_clients
        self.c = (self.server_control(model).double() + step).float()
        return {"control_norm": float(self.c.norm())}

    def broadcast_state(self, model):
        return {"c": self.server_control(model)}

    def receive_state(self, tensors):
        self.c = tensors["c"].cpu().clone()

    def state_dict(self):
        return {"optimizer": super().state_dict(), "c": self.c}

    def load_state_dict(self, state):
        if state:
            super().load_state_dict(state["optimizer"])
            self.c = state["c"]
