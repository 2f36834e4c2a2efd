"""edgebundle: ship container images to edge devices as verified, delta-sized bundles.

Data flow (one module per noun, each importing only those before it):

    manifest -> resolve -> plan -> pack -> format -> transfer -> importer -> report

Device-side modules (``format``, ``importer``, ``reference``, ``model``, ``errors``,
``inventory``, ``plan``) depend only on zstandard, msgpack and xxhash; the packer extra adds
httpx, paramiko, pyyaml and tqdm.
"""

__version__ = "0.1.0"
