"""The commands of ``examples/cifar.py``, one module each (the shared parts in ``common``):

- :mod:`.fit`: ``train`` and ``finetune`` (feature decay, distillation, gate-aware fine-tuning);
- :mod:`.average`: ``average`` (weight averaging, BatchNorm re-estimated);
- :mod:`.evaluate`: ``evaluate`` (ispc against dense and static pruning, the CV checks).
"""
