"""Stages of the method, one module each: federated finetuning (later: annotate, pretrain, align)."""
