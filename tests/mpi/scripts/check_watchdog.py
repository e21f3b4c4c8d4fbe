"""A blocking collective that one rank never joins must abort the job at its deadline."""

import time

from mpiopt.comm.transport import Transport, mpi_info

t = Transport(timeout=1.0)
t.step = 7
if t.rank == 0:
    print(f"thread level {mpi_info()['thread_level']}", flush=True)
    time.sleep(30)  # never joins: the others' watchdog must end the job long before this
else:
    t.barrier()
print("unreachable", flush=True)
