"""What the pipeline's stages share: flow maths, metrics, image I/O, synthetic data.

``shardgen``, ``train`` and ``infer`` import from here and never from each other.
"""
