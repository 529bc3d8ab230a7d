"""The environment torchrun would give one rank, so a benchmark can build a real engine in-process,
and the engine itself."""
import os


def single_rank_env() -> None:
    from gridtrain.parallel.groups import single_process_env

    single_process_env()


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
