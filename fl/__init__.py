"""Minimal federated-learning loop for FLoCoRA, FLASC and FedLoRA on flocora_codec.

Layout: ``models`` (ResNet-8/18 with GroupNorm, FedLoRA's CNN family),
``lora`` (adapters and FLoCoRA's placement modes), ``data`` (loaders,
Dirichlet split, augmentation), ``training`` (``train_client``, ``evaluate``),
``aggregation`` (server-side averaging and optimizers), ``comm`` (codec specs,
message checks, analytic sizes), ``methods`` (FedAvg, FLoCoRA, FLASC,
FedLoRA), ``loop`` (rounds, bytes, faults, logs), ``report`` (tables, plots),
``cli`` (``python -m fl``).
"""
