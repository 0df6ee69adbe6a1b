"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) run on our two model classes.

The mixins are not copied here: they are imported from the transformers sdist of the installed version, which
`make` extracts into `.transformers_sdist/` (or point `TRANSFORMERS_SDIST` at an extracted sdist). Without it,
this module skips, except in CI (`CI=true`), where it fails. The sdist ships the common test files but not three helper modules they import; those are
supplied below as stand-ins (see `_install_stand_ins`), which only drops the export tests of
`ExportTesterMixin`. What is ours is the model tester, written as transformers writes one per model (after its
DeiT tester), and our class names registered where the mixins look names up.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
import unittest
import warnings
from pathlib import Path
from unittest import mock

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[1]
SDIST = Path(
    os.environ.get(
        "TRANSFORMERS_SDIST", ROOT / ".transformers_sdist" / f"transformers-{transformers.__version__}"
    )
)
PACKAGE = "transformers_sdist_tests"

# In CI (CI=true) these tests must run: a missing sdist or `parameterized` is a failure there, a skip elsewhere.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if not (SDIST / "tests" / "test_modeling_common.py").is_file():
    missing = (
        f"transformers {transformers.__version__} sdist not found at {SDIST} (run `make transformers-sdist`)"
    )
    if IN_CI:
        pytest.fail(f"CI=true: {missing}; the common model tests must run in CI.", pytrace=False)
    pytest.skip(missing, allow_module_level=True)
if IN_CI:
    import parameterized  # noqa: F401  (an ImportError fails the module in CI)
else:
    pytest.importorskip("parameterized", reason="transformers' common tests need `parameterized` (dev extra)")


def _install_stand_ins() -> None:
    """Make the sdist's `tests/` importable as a package, with stand-ins for the helpers it does not ship."""
    # In the repository tests/ is a package; the sdist drops its (empty) __init__.py, which
    # test_configuration_common reads through `direct_transformers_import`.
    (SDIST / "tests" / "__init__.py").touch()
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(SDIST / "tests")]
    package.__spec__ = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
    sys.modules.setdefault(PACKAGE, package)

    def module(name: str, **attributes: object) -> None:
        stand_in = types.ModuleType(f"{PACKAGE}.{name}")
        stand_in.__dict__.update(attributes)
        sys.modules.setdefault(stand_in.__name__, stand_in)

    for name in ("exporters", "generation", "utils"):
        module(name, __path__=[])
    # Base classes without tests: export (torch.export/executorch) and generation do not apply to this model.
    module("exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
    module("generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
    # `check_config_arguments_init` sets each of these common fields to a non-default value and reads it back.
    module(
        "utils.test_configuration_utils",
        config_common_kwargs={
            "return_dict": False,
            "output_hidden_states": True,
            "output_attentions": True,
            "dtype": "float16",
            "chunk_size_feed_forward": 5,
            "architectures": ["DeiTDistillForImageClassification"],
            "id2label": {0: "label"},
            "label2id": {"label": "0"},
            "problem_type": "regression",
        },
    )


_install_stand_ins()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

with warnings.catch_warnings():
    # Its marks (flash_attn_test, ...) are registered by transformers' own conftest, which is not used here.
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from transformers_sdist_tests.test_configuration_common import ConfigTester
    from transformers_sdist_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor

from deit_distill.modeling_deit_distill import (  # noqa: E402
    DeiTDistillConfig,
    DeiTDistillForImageClassification,
    DeiTDistillModel,
)

# The mixins decide which inputs and labels a class gets from transformers' name mappings.
NAME_MAPPINGS = (
    (modeling_auto.MODEL_MAPPING_NAMES, DeiTDistillModel.__name__),
    (modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, DeiTDistillForImageClassification.__name__),
)


class DeiTDistillModelTester:
    """Small configs and inputs for the common tests (the sizes of transformers' DeiT tester)."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 13, image_size: int = 30) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = 2
        self.num_channels = 3
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.intermediate_size = 37
        self.type_sequence_label_size = 10
        self.is_training = True
        # CLS and DIST tokens before the patches.
        self.seq_length = (image_size // self.patch_size) ** 2 + 2

    def get_config(self) -> DeiTDistillConfig:
        return DeiTDistillConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            attn_implementation="eager",
        )

    def prepare_config_and_inputs(self) -> tuple[DeiTDistillConfig, torch.Tensor, torch.Tensor]:
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.type_sequence_label_size)
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self) -> tuple[DeiTDistillConfig, dict[str, torch.Tensor]]:
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class DeiTDistillModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (DeiTDistillModel, DeiTDistillForImageClassification)
    test_resize_embeddings = False

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls._patches = [mock.patch.dict(names, {"deit_distill": name}) for names, name in NAME_MAPPINGS]
        for patch in cls._patches:
            patch.start()

    @classmethod
    def tearDownClass(cls) -> None:
        for patch in cls._patches:
            patch.stop()
        super().tearDownClass()

    def setUp(self) -> None:
        self.model_tester = DeiTDistillModelTester(self)
        # transformers' DeiT test passes hidden_size=32 alone; with the default 12 heads that is a config our
        # validate() rejects (DeiTConfig checks nothing), so the head count comes with it.
        self.config_tester = ConfigTester(
            self,
            config_class=DeiTDistillConfig,
            has_text_modality=False,
            hidden_size=32,
            num_attention_heads=4,
        )

    def test_config(self) -> None:
        self.config_tester.run_common_tests()

    @unittest.skip(reason="DeiT takes pixel_values, not inputs_embeds")
    def test_inputs_embeds(self) -> None:
        pass

    def test_model_get_set_embeddings(self) -> None:
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, nn.Linear))

    def test_model(self) -> None:
        config, pixel_values, _ = self.model_tester.prepare_config_and_inputs()
        result = DeiTDistillModel(config).eval()(pixel_values)
        expected = (self.model_tester.batch_size, self.model_tester.seq_length, self.model_tester.hidden_size)
        self.assertEqual(result.last_hidden_state.shape, expected)

    def test_for_image_classification(self) -> None:
        config, pixel_values, labels = self.model_tester.prepare_config_and_inputs()
        config.num_labels = self.model_tester.type_sequence_label_size
        result = DeiTDistillForImageClassification(config).eval()(pixel_values, labels=labels)
        self.assertEqual(result.logits.shape, (self.model_tester.batch_size, config.num_labels))
