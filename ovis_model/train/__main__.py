"""`python -m ovis_model.train` (what `torchrun -m` and `deepspeed --module` launch) = `ovis-train`."""

from .cli import main

if __name__ == "__main__":
    main()
