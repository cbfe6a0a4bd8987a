"""Tests of what the GPU round trip relies on, run on the CPU: --device, --stop-after-s with
--resume (bit-identical to an uninterrupted run, also from a state that says it was written on a
CUDA device), the contents of the files (CPU tensors, types torch >= 2.6 loads with its default
weights_only=True), and DMDSERVE_FASHION_MNIST_DIR."""

import collections
import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import unittest
from unittest import mock

import torch

from training import common, data, train_dmd, train_teacher
from training.eval import fashion_data

# What torch >= 2.6's torch.load(weights_only=True) rebuilds besides tensors: exactly these types
# (a numpy float is a float subclass, and is refused).
SAFE_TYPES = (dict, collections.OrderedDict, list, tuple, str, int, float, bool, type(None))
STOP_NOW = ["--stop-after-s", "1e-9"]  # stops after every step
CHECKPOINTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "checkpoints")


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _teacher_args(folder, *extra):
    return train_teacher.parse_args([
        "--steps", "4", "--subset", "300", "--batch-size", "8", "--channels", "16",
        "--save-every", "100", "--log-every", "3", "--out", os.path.join(folder, "teacher.pt"),
        "--state", os.path.join(folder, "state.pt"), *extra])


def _dmd_args(folder, teacher, *extra):
    return train_dmd.parse_args([
        "--teacher", teacher, "--steps", "3", "--subset", "300", "--batch-size", "4",
        "--fake-steps", "1", "--ema", "0.9", "--eval-every", "2", "--eval-per-class", "1",
        "--save-every", "100", "--log-every", "2", "--out", os.path.join(folder, "dmd.pt"),
        "--state", os.path.join(folder, "state.pt"), *extra])


def _quiet(fn, *args):
    """fn(*args) with stdout captured; returns (result, text)."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        result = fn(*args)
    return result, text.getvalue()


def _assert_portable(test, obj, where="state"):
    """Every tensor on the CPU, every other object of a type weights_only loading accepts."""
    if isinstance(obj, torch.Tensor):
        test.assertEqual(obj.device.type, "cpu", where)
        return
    test.assertIn(type(obj), SAFE_TYPES, where)
    if isinstance(obj, dict):
        for key, value in obj.items():
            _assert_portable(test, key, f"{where} key")
            _assert_portable(test, value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _assert_portable(test, value, f"{where}[{i}]")


_FAKE_CUDA = [False]
# While _FAKE_CUDA[0] is set, torch.save records every storage as living on cuda:0, as a file
# written on a GPU machine does.
torch.serialization.register_package(
    0, lambda obj: "cuda:0" if _FAKE_CUDA[0] else None, lambda obj, location: None)


@contextlib.contextmanager
def _as_if_on_cuda():
    _FAKE_CUDA[0] = True
    try:
        yield
    finally:
        _FAKE_CUDA[0] = False


class StopAndResumeTest(unittest.TestCase):
    """A teacher (4 steps) and a DMD run (3 steps) made uninterrupted with the default device,
    and again with --device cpu stopped by --stop-after-s after every step and resumed."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dirs = {name: os.path.join(cls.tmp.name, name)
                    for name in ("teacher_full", "teacher_stopped", "dmd_full", "dmd_stopped")}
        for d in cls.dirs.values():
            os.makedirs(d)
        cls.teacher = os.path.join(cls.dirs["teacher_full"], "teacher.pt")
        cls.teacher_full, _ = _quiet(train_teacher.train, _teacher_args(cls.dirs["teacher_full"]))
        cls.teacher_runs = cls._until_done(
            train_teacher.train, lambda: _teacher_args(cls.dirs["teacher_stopped"], "--device",
                                                       "cpu", "--resume", *STOP_NOW))
        cls.dmd_full, _ = _quiet(train_dmd.train, _dmd_args(cls.dirs["dmd_full"], cls.teacher))
        cls.dmd_runs = cls._until_done(
            train_dmd.train, lambda: _dmd_args(cls.dirs["dmd_stopped"], cls.teacher, "--device",
                                               "cpu", "--resume", *STOP_NOW))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @staticmethod
    def _until_done(train, make_args, limit=10):
        """Invokes train until it returns a summary; a list of (result, stdout, state step, the
        state file's copy) per invocation."""
        runs = []
        for i in range(limit):
            args = make_args()
            result, text = _quiet(train, args)
            copy = f"{args.state}.{i}"
            shutil.copy(args.state, copy)
            runs.append((result, text, common.load(args.state)["step"], copy))
            if result is not None:
                return runs
        raise AssertionError(f"no summary after {limit} invocations")

    def test_teacher_stops_after_each_step_and_resumes_bit_identically(self):
        self.assertEqual([r[2] for r in self.teacher_runs], [1, 2, 3, 4])
        self.assertEqual([r[0] is None for r in self.teacher_runs], [True, True, True, False])
        self.assertIn("stopped by --stop-after-s 1e-09 at step 1/4", self.teacher_runs[0][1])
        self.assertIn("--resume", self.teacher_runs[0][1])
        self.assertIn("resumed from", self.teacher_runs[1][1])
        full, stopped = (os.path.join(self.dirs[k], "teacher.pt")
                         for k in ("teacher_full", "teacher_stopped"))
        self.assertEqual(_sha256(full), _sha256(stopped))
        # The loss curve too: the losses since the last curve point travel in the state.
        self.assertEqual(self.teacher_runs[-1][0]["loss_curve"], self.teacher_full["loss_curve"])
        self.assertEqual(self.teacher_full["device"], "cpu")

    def test_out_is_written_only_when_steps_are_reached(self):
        with tempfile.TemporaryDirectory() as tmp:
            args = _teacher_args(tmp, *STOP_NOW)
            self.assertIsNone(_quiet(train_teacher.train, args)[0])
            self.assertFalse(os.path.exists(args.out))
            self.assertEqual(common.load(args.state)["step"], 1)

    def test_dmd_stops_after_each_step_and_resumes_bit_identically(self):
        self.assertEqual([r[2] for r in self.dmd_runs], [1, 2, 3])
        self.assertIn("stopped by --stop-after-s 1e-09 at step 1/3", self.dmd_runs[0][1])
        full, stopped = (os.path.join(self.dirs[k], "dmd.pt") for k in ("dmd_full", "dmd_stopped"))
        self.assertEqual(_sha256(full), _sha256(stopped))
        summary = self.dmd_runs[-1][0]
        self.assertEqual(summary["curve"], self.dmd_full["curve"])
        self.assertEqual([e["step"] for e in summary["evals"]], [0, 2, 3])
        self.assertEqual(summary["evals"], self.dmd_full["evals"])

    def test_files_hold_cpu_tensors_and_weights_only_types(self):
        for folder, names in (("teacher_full", ("teacher.pt", "state.pt")),
                              ("dmd_full", ("dmd.pt", "state.pt"))):
            for name in names:
                path = os.path.join(self.dirs[folder], name)
                _assert_portable(self, common.load(path), path)

    def test_a_state_written_on_cuda_resumes_on_the_cpu(self):
        state = common.load(self.teacher_runs[1][3])  # after step 2
        with tempfile.TemporaryDirectory() as tmp:
            args = _teacher_args(tmp, "--resume")
            with _as_if_on_cuda():
                torch.save(state, args.state)
            if not torch.cuda.is_available():
                with self.assertRaises(RuntimeError):  # the file does name a CUDA device
                    torch.load(args.state)
            summary, text = _quiet(train_teacher.train, args)
            self.assertIn("at step 2", text)
            self.assertEqual(summary["steps"], 4)
            self.assertEqual(_sha256(args.out), _sha256(self.teacher))


class CommittedCheckpointsTest(unittest.TestCase):
    def test_the_device_can_read_them_with_weights_only(self):
        """The GPU stages load these with torch 2.x's default torch.load (weights_only=True)."""
        for name in ("autoencoder.pt", "classifier.pt", "teacher.pt", "dmd.pt"):
            path = os.path.join(CHECKPOINTS, name)
            if os.path.exists(path):
                _assert_portable(self, common.load(path), path)


class DeviceTest(unittest.TestCase):
    @unittest.skipIf(torch.cuda.is_available(), "this machine has CUDA")
    def test_cuda_without_a_gpu_is_a_clear_error(self):
        with self.assertRaisesRegex(SystemExit, "--device cuda: .* sees no CUDA device"):
            common.device("cuda")

    def test_cpu(self):
        self.assertEqual(common.device("cpu"), torch.device("cpu"))


class DataDirTest(unittest.TestCase):
    def test_env_var_replaces_the_directory(self):
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
                os.symlink(os.path.join(data.DEFAULT_DIR, name), os.path.join(tmp, name))
            with mock.patch.dict(os.environ, {data.DIR_ENV: tmp}):
                self.assertEqual(data.fashion_mnist_dir(), tmp)
                images, labels = data.load_split("test", subset=5)
                raw_images, raw_labels = fashion_data.load_split("test")
        self.assertEqual(tuple(images.shape), (5, 1, 32, 32))
        self.assertEqual(labels.tolist(), raw_labels[:5].tolist())
        self.assertEqual(raw_images.shape, (10000, 32, 32))

    def test_empty_directory_is_a_clear_error_naming_it(self):
        with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ,
                                                                   {data.DIR_ENV: tmp}):
            for load in (data.load_split, fashion_data.load_split):
                with self.assertRaises(FileNotFoundError) as cm:
                    load("train")
                message = str(cm.exception)
                self.assertIn(tmp, message)
                self.assertIn("train-images-idx3-ubyte.gz", message)
                self.assertIn(data.DIR_ENV, message)

    def test_default_without_the_variable(self):
        with mock.patch.dict(os.environ):
            os.environ.pop(data.DIR_ENV, None)
            self.assertEqual(data.fashion_mnist_dir(), data.DEFAULT_DIR)


if __name__ == "__main__":
    unittest.main()
