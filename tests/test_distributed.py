"""distributed.py without launching processes: what the launchers' environments mean, the global batch size, the
detection of an `accelerate launch` that started one process instead of several, and the fixes to fastai's
DistributedDL on a one-process gloo group."""
import os

import pytest

from finegrained import distributed
from finegrained.errors import UserError

LAUNCH_VARS = (*distributed.SIZE_VARS, *distributed.RANK_VARS, *distributed.LOCAL_RANK_VARS, *distributed.LOCAL_SIZE_VARS,
               "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION")
OUTSIDE = {name: os.environ.get(name) for name in LAUNCH_VARS}


@pytest.fixture
def env(monkeypatch):
    """A clean environment as a plain `python run.py` sees it; set what a launcher would set on top."""
    for name in LAUNCH_VARS:
        monkeypatch.setenv(name, "")  # recorded, so that whatever setup() exports is undone after the test
        monkeypatch.delenv(name)
    return monkeypatch


def accelerate_env(argv, tmp_path, monkeypatch):
    """The environment accelerate's own simple launcher gives the script for `accelerate launch ARGV script.py`."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no accelerate config file of this machine
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*argv, "run.py"]))
    assert not args.multi_gpu  # the simple launcher: one process
    _, child_env = prepare_simple_launcher_cmd_env(args)
    return {k: v for k, v in child_env.items() if os.environ.get(k) != v}


def test_plain_run_is_one_process(env):
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank(), distributed.is_main()) == (1, 0, 0, True)
    assert distributed.setup() == 1
    assert "ACCELERATE_USE_CPU" not in os.environ


def test_torchrun_environment(env):
    for name, value in dict(WORLD_SIZE="4", RANK="3", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        env.setenv(name, value)
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (4, 3, 1)
    assert distributed.local_world_size() == 2 and not distributed.is_main()


def test_mpi_environment_is_read_too(env):
    env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    env.setenv("OMPI_COMM_WORLD_RANK", "1")
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (2, 1, False)


@pytest.mark.parametrize("bs,world,expected", [(32, 1, 32), (32, 4, 8), (16, 2, 8), (6, 3, 2)])
def test_batch_size_is_the_global_batch(bs, world, expected):
    assert distributed.per_process_bs(bs, world) == expected


def test_batch_size_that_does_not_divide_is_refused():
    with pytest.raises(UserError, match=r"^--bs 30 does not divide by 4 processes; .*multiple of 4"):
        distributed.per_process_bs(30, 4)


def test_batch_size_defaults_to_the_launched_world(env):
    env.setenv("WORLD_SIZE", "2")
    assert distributed.per_process_bs(16) == 8


@pytest.mark.parametrize("argv", [["--cpu", "--num_processes", "2"], ["--num_processes", "4"],
                                  ["--cpu", "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "10.0.0.1",
                                   "--main_process_port", "29500", "--machine_rank", "0"]])
def test_accelerate_launch_that_started_one_process_is_stopped(argv, env, tmp_path):
    for name, value in accelerate_env(argv, tmp_path, env).items():
        env.setenv(name, value)
    assert distributed.launched_alone()
    with pytest.raises(UserError, match=r"^accelerate launch started 1 process.*torchrun --nproc_per_node N .*--multi_gpu") as err:
        distributed.setup()
    assert "\n" not in str(err.value)


def test_accelerate_launch_of_one_process_goes_on(env, tmp_path):
    for name, value in accelerate_env(["--cpu"], tmp_path, env).items():
        env.setenv(name, value)
    assert not distributed.launched_alone()
    assert distributed.setup() == 1


def test_torchrun_is_not_taken_for_a_lone_process(env):
    for name, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        env.setenv(name, value)
    assert not distributed.launched_alone() and distributed.setup() == 1


@pytest.fixture
def fastai_dl_class(monkeypatch):
    """fastai's DistributedDL, its methods restored after the test (setup() replaces two of them)."""
    from fastai.distributed import DistributedDL
    for name in ("_broadcast", "__len__"):
        monkeypatch.setattr(DistributedDL, name, getattr(DistributedDL, name))
    monkeypatch.setattr(distributed, "_installed", distributed._installed)
    return DistributedDL


def test_setup_of_several_cpu_processes(env, fastai_dl_class):  # what setup() exports is undone by `env`
    if distributed._cuda():
        pytest.skip("the CPU path is taken only without CUDA")
    env.setenv("PMI_SIZE", "2")  # mpirun names: exported under torch's, which fastai reads
    env.setenv("PMI_RANK", "1")
    assert distributed.setup() == 2
    assert (os.environ["WORLD_SIZE"], os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("2", "1", "0")
    assert os.environ["ACCELERATE_USE_CPU"] == "1"
    assert fastai_dl_class._broadcast is distributed._broadcast and fastai_dl_class.__len__ is distributed._len


def test_context_is_nothing_in_one_process(env):
    learn = object()  # never touched: no distrib_ctx needed
    with distributed.context(learn) as inside:
        assert inside is learn


def test_context_without_setup_says_so(env, monkeypatch):
    env.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_installed", False)
    with pytest.raises(RuntimeError, match="setup"):
        with distributed.context(object()):
            pass


@pytest.mark.parametrize("before", [None, "4"])
def test_local_hides_the_other_processes_from_fastai(env, before):
    if before:
        env.setenv("WORLD_SIZE", before)
    from fastai.torch_core import num_distrib
    with distributed.local():
        assert num_distrib() == 1 and distributed.world_size() == 1
    assert os.environ.get("WORLD_SIZE") == before


def test_unwrap_and_barrier_outside_training(env):
    from types import SimpleNamespace
    from torch import nn
    model = nn.Linear(2, 2)
    assert distributed.unwrap(SimpleNamespace(module=model)) is model  # DistributedDataParallel keeps it as .module
    assert distributed.unwrap(model) is model
    distributed.barrier()  # no process group: returns at once
    distributed.teardown()


def test_sync_batchnorm_keeps_timm_models_and_the_frozen_stage_recipe():
    """fastai's sync_bn uses torch's converter, which drops the activation of timm's BatchNormAct2d; and fastai finds
    the BatchNorm layers that keep training in frozen stages (train_bn) by type, which SyncBatchNorm is not."""
    import timm
    import torch
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from torch import nn
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=3).eval()
    learn = Learner(DataLoaders(device="cpu"), model, loss_func=nn.CrossEntropyLoss(), train_bn=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    params = list(model.parameters())
    distributed.sync_batchnorm(learn)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in learn.model.modules())
    assert list(learn.model.parameters()) == params  # the same tensors: the optimizer still holds them
    with torch.no_grad():
        assert torch.allclose(learn.model.eval()(x), before, atol=1e-5)
    bn_weight = next(m.weight for m in learn.model.modules() if isinstance(m, nn.SyncBatchNorm))
    assert learn.opt.state[bn_weight].get("force_train")  # still trains while the body is frozen


@pytest.fixture
def gloo_group():
    """A one-process gloo group: enough for DistributedDL's broadcast of the epoch's indices."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


def _ddls(fastai_dl_class, n, bs, drop_last, world=2):
    from fastai.data.core import TfmdDL
    distributed._install_fixes()
    dl = TfmdDL(list(range(n)), bs=bs, shuffle=False, drop_last=drop_last)
    return [fastai_dl_class(dl, rank=r, world_size=world) for r in range(world)]


@pytest.mark.parametrize("n,bs,drop_last", [(10, 3, False), (11, 3, False), (10, 3, True), (23, 4, True), (7, 2, False)])
def test_each_rank_takes_its_share_of_every_epoch(fastai_dl_class, gloo_group, n, bs, drop_last):
    ddls = _ddls(fastai_dl_class, n, bs, drop_last)
    seen = []
    for ddl in ddls:
        batches = [b.tolist() for b in ddl]
        assert len(ddl) == len(batches)  # the exact count: one-cycle ends where it should
        assert all(len(b) == bs for b in batches) or not drop_last
        seen.append([i for b in batches for i in b])
    share = -(-n // 2)
    padded = (list(range(n)) * 2)[:2 * share]  # the first items again, so that every rank gets as many
    for r, items in enumerate(seen):
        mine = padded[r * share:(r + 1) * share]
        assert items == (mine[:len(mine) // bs * bs] if drop_last else mine)  # drop_last: each rank drops its own rest


def test_broadcast_runs_on_the_groups_device(fastai_dl_class, gloo_group):
    ddl = _ddls(fastai_dl_class, 4, 2, False)[0]
    assert distributed._collective_device().type == "cpu"  # gloo: CPU tensors, no .cuda()
    assert ddl._broadcast([3, 1, 2], 0) == [3, 1, 2]



def test_nothing_leaks_into_later_tests():  # runs last in this file
    assert {name: os.environ.get(name) for name in LAUNCH_VARS} == OUTSIDE
    from fastai.distributed import DistributedDL
    assert DistributedDL._broadcast is not distributed._broadcast


def test_the_scripts_error_line_comes_from_rank_0_alone(monkeypatch, capsys):
    """cli.run asks ranks.is_main, the one rank-0 helper: every process of a data-parallel run exits alike, one says why
    (an MPI launcher's PMI_RANK counts as torchrun's RANK)."""
    import pytest as _pytest
    from finegrained import cli
    from finegrained.errors import UserError

    def fail():
        raise UserError("bad input")
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for env, shown in ((None, True), (("RANK", "1"), False), (("PMI_RANK", "2"), False), (("RANK", "0"), True)):
        if env:
            monkeypatch.setenv(*env)
        with _pytest.raises(SystemExit):
            cli.run(fail)
        assert ("error: bad input" in capsys.readouterr().err) is shown, env
        if env:
            monkeypatch.delenv(env[0])
