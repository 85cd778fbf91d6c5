"""The model families Shipyard can train: one explicit dict, explicit imports.

A family is a `shipyard_models.family.Family`; adding a paper means importing its `FAMILY` here.
"""
from shipyard_models.family import Family
from shipyard_models.layerskip import FAMILY as LAYERSKIP
from shipyard_models.minrnn import FAMILY as MINRNN

MODELS: dict[str, Family] = {
    MINRNN.name: MINRNN,
    LAYERSKIP.name: LAYERSKIP,
}
