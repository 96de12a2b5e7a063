"""A small image classifier, trained by a three-stage pipeline: prepare -> train -> evaluate.

Each module has one job: `data` makes or reads the images, `transforms` normalises and augments them,
`model` is the network, `metrics` scores predictions, `tracking` talks to Weights & Biases, `config`
composes the Hydra configuration, and `prepare`, `train`, `evaluate` are the pipeline's stages.
"""
