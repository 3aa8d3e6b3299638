"""Splitting one `free generate` run over processes and nodes started by a launcher (`torchrun`,
or anything that sets RANK, WORLD_SIZE and LOCAL_RANK the same way).

Rank r of N decodes the records r, r + N, r + 2N, ... of the input and writes them, in order, to
its part file beside the output (`OUT.part-r-of-N`), which `--resume` continues after a kill like
any output. Each rank marks its part done when it ends; the rank that finds every part done merges
them, round robin, into the output (written to a temporary file and renamed, so a merge cut short
leaves the parts to merge again). No rank waits for another, and no network is needed beyond the
shared folder of the output. `--threshold auto` learns per rank, from its own records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from ..errors import ConfigError, OutputError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=os.environ) -> "Shard | None":
        """The launcher's shard, or None when the run is not sharded (one process)."""
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
        if not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} does not lie in [0, WORLD_SIZE={world})")
        return cls(rank, world, local)

    def check(self, output: Path | None) -> None:
        if output is None:
            raise OutputError(f"a sharded run (WORLD_SIZE={self.world}) needs --output FILE: each rank writes its part beside it")

    def share(self, total: int | None) -> int | None:
        """How many of `total` records this rank decodes."""
        return None if total is None else len(range(self.rank, total, self.world))

    def take(self, records: Iterable[T]) -> Iterator[T]:
        """This rank's share of the records: every world-th, from the rank's own index."""
        for i, record in enumerate(records):
            if i % self.world == self.rank:
                yield record

    def complete(self, output: Path) -> bool:
        """Whether `output` holds a merged run: it exists and no rank's part is left."""
        return output.exists() and not any(self.part(output, r).exists() for r in range(self.world))

    def part(self, output: Path, rank: int | None = None) -> Path:
        rank = self.rank if rank is None else rank
        return output.with_name(f"{output.name}.part-{rank}-of-{self.world}")

    def device(self, device: str) -> str:
        """The device a rank uses: its own GPU (LOCAL_RANK) when CUDA is asked for or automatic."""
        import torch

        if device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def finish(self, output: Path) -> bool:
        """Marks this rank's part done; merges every part into `output` when all are done and no
        other rank has claimed the merge. Returns whether this rank merged."""
        self._done(self.rank, output).touch()
        if not all(self._done(r, output).exists() for r in range(self.world)):
            return False
        claim = output.with_name(f"{output.name}.merging")
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        try:
            merge([self.part(output, r) for r in range(self.world)], output)
            for r in range(self.world):
                self.part(output, r).unlink()
                self._done(r, output).unlink()
        finally:
            claim.unlink()
        return True

    def _done(self, rank: int, output: Path) -> Path:
        return output.with_name(f"{output.name}.part-{rank}-of-{self.world}.done")


def merge(parts: list[Path], output: Path) -> None:
    """Interleaves the parts' lines round robin (part r holds records r, r + N, ...) into
    `output`, atomically. Parts that cannot come from one input (a part longer than one before
    it, or shorter by more than one line than the first) are refused."""
    tmp = output.with_name(f".{output.name}.merge")
    files = [open(p, "rb") for p in parts]
    try:
        with open(tmp, "wb") as out:
            while True:
                line, r = b"", 0
                for r, f in enumerate(files):
                    line = f.readline()
                    if not line:
                        break
                    out.write(line)
                if line:
                    continue
                # part r is exhausted: every part after it must be too, and none may hold more
                if any(f.readline() for f in files):
                    raise OutputError(f"the parts of {output} do not split one input: {parts[r]} ends before a part after it")
                break
        os.replace(tmp, output)
    finally:
        for f in files:
            f.close()
        tmp.unlink(missing_ok=True)
