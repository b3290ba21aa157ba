"""ava: turn a handful of GPU nodes you can SSH into into one training cluster.

Kept import-free: training scripts on the nodes import ava.ckpt, ava.env and ava.data, and
`ava --help` must stay fast.
"""

__version__ = "0.1.0"
