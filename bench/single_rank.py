"""The environment torchrun would give one rank, so a benchmark can build a real engine in-process,
and the engine itself."""
import os
import socket


def single_rank_env() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def start_engine(cfg):
    """(ParallelContext, TrainEngine) of a RunConfig on the world torchrun (or single_rank_env)
    describes, built the way a training rank builds them."""
    from gridtrain.parallel import groups
    from gridtrain.parallel.layout import build_layout
    from gridtrain.train.loop import build_engine_of

    layout = build_layout(cfg.parallel, cfg.train.micro_batch_size, cfg.train.global_batch_size,
                          int(os.environ["WORLD_SIZE"]))
    ctx = groups.initialize(cfg.parallel, layout)
    return ctx, build_engine_of(cfg, ctx)
