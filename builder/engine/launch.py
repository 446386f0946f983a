"""Starting the train (and preference) stage under `accelerate launch`, from params.yaml's `launch` settings.

`dvc.yaml` calls `tunefile stage train R` whatever the machine: launch settings are machine-level
and in no key, so a colleague with 8 GPUs and one with a laptop share dvc.yaml and dvc.lock, and
changing `num_processes` reruns nothing. The stage itself starts the launcher when params.yaml
asks for more than one process or names an accelerate config (DDP, FSDP, DeepSpeed, multi-node):

    accelerate launch [--config_file F] [--multi_gpu --num_processes N] -m builder stage train R

The launching process holds the recipe lock; the launched ranks know it from the environment.
Rank 0 publishes the stage exactly as a one-process train does.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from builder.errors import StageError
from builder.recipe.project import Project

LAUNCHED_ENV = "TUNEFILE_LAUNCHED"  # set in launched ranks: the recipe lock path their parent holds


def wants_launch(project: Project) -> bool:
    """Whether this process should start the launcher rather than train itself."""
    return project.params.launch.distributed and LAUNCHED_ENV not in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(project: Project, recipe: str, kind: str = "train") -> list[str]:
    launch = project.params.launch
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch.config_file is not None:
        config = project.root / launch.config_file
        if not config.is_file():
            raise StageError(f"params.yaml launch.config_file: {config} does not exist "
                             "(write one with `accelerate config --config_file PATH`)")
        cmd += ["--config_file", str(config)]
        if launch.num_processes > 1:
            cmd += ["--num_processes", str(launch.num_processes)]
    else:
        # accelerate's multi-process launcher (torchrun underneath); on a machine without CUDA the
        # ranks run on CPU with gloo. A free port, so two builds on one machine do not collide.
        cmd += ["--multi_gpu", "--num_processes", str(launch.num_processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    return cmd + ["-m", "builder", "stage", kind, recipe]


def run_launched(project: Project, recipe: str, kind: str, lock_path: str) -> None:
    """Run stage `kind` (train or preference) of `recipe` under accelerate launch; raise if any rank failed."""
    cmd = launch_command(project, recipe, kind)
    env = {**os.environ, LAUNCHED_ENV: lock_path}
    print(f"{recipe}/{kind}: accelerate launch {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=project.root, env=env)
    if done.returncode != 0:
        raise StageError(f"{recipe}/{kind} under accelerate launch exited with status {done.returncode} "
                         "(its output is above)")
