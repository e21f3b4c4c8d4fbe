"""Communication: the only package that imports ``mpi4py.MPI``.

``transport`` (duplicated communicator, channels, byte accounting, deadlines, GPU staging),
``windows`` (RMA and node-local shared-memory windows) and ``topology`` (graphs over ranks,
mixing matrices). Submodules are imported explicitly so that importing this package does not
initialise MPI.
"""
