"""The Reverb server as a Ray actor, so csil-launch can pin it next to the learner (on the head node).

It answers on the node's IP (not localhost) so actors on other nodes can write to it; checkpoints go to the
run directory and ``restore=True`` brings back the tables (sizes verified) for ``--resume``.
"""

from __future__ import annotations

import ray

from csil.config import ReplayConfig
from csil.specs import ObsSpec


@ray.remote(num_cpus=0, max_restarts=0)
class ReplayService:
    def __init__(self, cfg: ReplayConfig, spec_json: str, num_demo_transitions: int, checkpoint_dir: str,
                 restore: bool):
        from replay.server import ReplayServer

        self.server = ReplayServer(cfg, ObsSpec.from_json(spec_json), num_demo_transitions,
                                   checkpoint_dir=checkpoint_dir, restore=restore)
        port = self.server.address.rsplit(":", 1)[1]
        self.address = f"{ray.util.get_node_ip_address()}:{port}"

    def get_address(self) -> str:
        return self.address

    def sizes(self) -> dict[str, int]:
        return self.server.sizes()

    def rate_limiter_info(self) -> dict[str, float]:
        return self.server.rate_limiter_info()

    def checkpoint(self) -> str:
        return self.server.checkpoint()

    def stop(self) -> None:
        self.server.stop()
