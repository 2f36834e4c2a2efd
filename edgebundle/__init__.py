"""edgebundle: ship container images to edge devices as verified, delta-sized bundles.

Data flow (one module per noun, each importing only those before it):

    manifest -> resolve -> plan -> pack -> format -> transfer -> importer -> report

Device-side modules (``errors``, ``files``, ``logs``, ``reference``, ``oci``, ``naming``,
``specs``, ``format``, ``holdings``, ``report``, ``importer``, ``usecases.device``) depend
only on zstandard, msgpack and xxhash; the packer extra adds httpx, paramiko, pyyaml and tqdm.
"""

__version__ = "0.3.0"
