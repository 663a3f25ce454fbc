"""The training stack: Hydra configs to Lightning runs that end in results.json.

Modules: :mod:`.schema` (config schemas), :mod:`.config` (config -> network, data module), :mod:`.data` (the data
module), :mod:`.metrics` (per-epoch aggregates), :mod:`.module` (the Lightning module), :mod:`.optim`
(optimisers and schedules), :mod:`.callbacks` (diagnostics) and :mod:`.pipeline` (train / evaluate runs). It
imports Lightning, Hydra and torchvision; the model API in :mod:`pcdeq` does not.
"""
