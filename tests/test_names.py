"""The static name lists of kdtune.names agree with the registries, and the CLI starts without torch."""

import subprocess
import sys

import pytest

from kdtune import names
from kdtune.errors import ConfigError


def test_model_names_are_the_registry_without_torchvision():
    from kdtune.models import MODELS

    assert list(names.MODEL_NAMES) == [n for n in MODELS.names() if not n.startswith(names.TV_PREFIX)]


def test_method_names_are_the_registry():
    from kdtune.losses import METHODS

    assert list(names.METHOD_NAMES) == METHODS.names()


def test_dataset_names_are_the_registry():
    from kdtune.data import DATASETS

    assert list(names.DATASET_NAMES) == DATASETS.names()


@pytest.mark.parametrize("data", ["digits", "disk-intervals", "disk-gaussians"])
def test_dataset_shapes_are_what_loading_gives(data):
    from kdtune.data import load_data

    bundle = load_data(data)
    assert names.DATASET_SHAPES[data] == (bundle.num_classes, bundle.in_channels)


def test_unknown_name_is_refused_with_a_short_list_and_the_command():
    with pytest.raises(ConfigError) as e:
        names.check_name("model", "resnet9", where="students[0]")
    msg = str(e.value)
    assert msg.startswith("students[0]: unknown model 'resnet9' (did you mean")
    assert "`kdtune models` lists them" in msg and "wrn_40_2" not in msg
    assert names.check_name("model", "tv_resnet18") == "tv_resnet18"
    with pytest.raises(ConfigError, match="unknown model 'tv_nosuch'"):
        names.check_name("model", "tv_nosuch")
    with pytest.raises(ConfigError, match="valid methods: at, cc, ce, crd, disk"):
        names.check_name("method", "kdd")


def test_import_help_and_refusals_do_not_import_heavy_libraries(tmp_path):
    code = (
        "import sys, kdtune, kdtune.cli, kdtune.config, kdtune.spec, kdtune.names, kdtune.preflight\n"
        "kdtune.cli.build_parser()\n"
        "assert kdtune.cli.main(['train', 'epochs=-1']) == 2\n"
        "assert kdtune.cli.main(['train', 'model=nosuch']) == 2\n"
        "assert kdtune.cli.main(['train', '--config', '/nonexistent.yaml']) == 2\n"
        "open('bad.yaml', 'w').write('data: digits\\nstudents: [resnet9]\\nmethods: [kd]\\n')\n"
        "assert kdtune.cli.main(['validate', 'bad.yaml']) == 2\n"
        "assert kdtune.cli.main(['sweep', 'bad.yaml']) == 2\n"
        "for argv in (['--help'], ['train', '--help'], ['sweep', '--help']):\n"
        "    try:\n"
        "        kdtune.cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna', 'torchvision') if m in sys.modules)\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "HEAVY:", p.stdout
