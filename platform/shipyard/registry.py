"""The model families Shipyard can train: one explicit dict, explicit imports.

A family is a `shipyard_models.family.Family`; adding a paper means importing its `FAMILY` here.
"""
from shipyard_models.allegro import FAMILY as ALLEGRO
from shipyard_models.family import Family
from shipyard_models.laplace import FAMILY as LAPLACE
from shipyard_models.layerskip import FAMILY as LAYERSKIP
from shipyard_models.matformer import FAMILY as MATFORMER
from shipyard_models.minrnn import FAMILY as MINRNN
from shipyard_models.tokenformer import FAMILY as TOKENFORMER
from shipyard_models.upt import FAMILY as UPT

MODELS: dict[str, Family] = {
    MINRNN.name: MINRNN,
    LAYERSKIP.name: LAYERSKIP,
    TOKENFORMER.name: TOKENFORMER,
    MATFORMER.name: MATFORMER,
    ALLEGRO.name: ALLEGRO,
    LAPLACE.name: LAPLACE,
    UPT.name: UPT,
}
