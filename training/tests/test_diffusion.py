"""Unit tests of the text-to-image stages: text encoder id remap, schedule, sampling loop vs the
served loop's reference, resumable teacher training and the DMD step's mechanics."""

import json
import os
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import torch

from training import captions, common, t2i, train_dmd, train_teacher

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class TextEncoderTest(unittest.TestCase):
    def test_known_ids_cover_every_caption(self):
        ids = t2i.known_token_ids()
        self.assertEqual(ids, sorted(set(ids)))
        self.assertIn(t2i.BOS_ID, ids)
        self.assertIn(t2i.EOS_ID, ids)
        for phrasings in captions.CAPTIONS:
            for text in phrasings:
                self.assertTrue(set(captions.tokenizer().encode(text)) <= set(ids), text)

    def test_remap_known_and_unknown_ids(self):
        encoder = t2i.TextEncoder([5, 9, 49406, 49407])
        ids = torch.tensor([[49406, 9, 7, 5, 0, 49407, 49407, 100000]])
        self.assertEqual(encoder.remap(ids).tolist(), [[3, 2, 0, 1, 0, 4, 4, 0]])

    def test_shapes_and_causality(self):
        torch.manual_seed(0)
        encoder = t2i.TextEncoder(t2i.known_token_ids()).eval()
        ids = captions.tokenize(["a sneaker", "a photo of a bag"])
        out = encoder(ids)
        self.assertEqual(tuple(out.shape), (2, 77, t2i.TEXT_DIM))
        changed = ids.clone()
        changed[:, 10] = 320  # a later token must not change earlier positions (causal mask)
        out2 = encoder(changed)
        self.assertTrue(torch.equal(out[:, :10], out2[:, :10]))
        self.assertFalse(torch.equal(out[:, 10:], out2[:, 10:]))

    def test_scripted_equals_eager(self):
        torch.manual_seed(0)
        encoder = t2i.TextEncoder(t2i.known_token_ids()).eval()
        unet = t2i.UNet(16).eval()
        ids = captions.tokenize(["a coat", "trainers"])
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 10])
        with torch.no_grad():
            emb = encoder(ids)
            self.assertTrue(torch.allclose(torch.jit.script(encoder)(ids), emb, atol=1e-6))
            self.assertTrue(torch.allclose(torch.jit.script(unet)(x, t, emb), unet(x, t, emb),
                                           atol=1e-5))


class ScheduleTest(unittest.TestCase):
    def test_scaled_linear_values(self):
        a = t2i.Schedule().alphas_cumprod
        self.assertEqual(len(a), 1000)
        # SD1.5's value at t = 999 as in the committed manifests (docs/BUNDLE.md).
        self.assertAlmostEqual(float(a[999]), 0.0046600960195064545, places=9)
        self.assertAlmostEqual(float(a[0]), 1 - 0.00085, places=7)
        self.assertTrue(bool((a[1:] < a[:-1]).all()))

    def test_x0_from_eps_inverts_add_noise(self):
        s = t2i.Schedule()
        x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
        t = torch.tensor([20, 500, 980])
        self.assertTrue(torch.allclose(s.x0_from_eps(s.add_noise(x0, noise, t), noise, t), x0,
                                       atol=1e-3))

    def test_trailing_timesteps(self):
        self.assertEqual(common.trailing_timesteps(1), [999])
        self.assertEqual(common.trailing_timesteps(4), [999, 749, 499, 249])
        self.assertEqual(len(common.trailing_timesteps(50)), 50)
        self.assertEqual(common.trailing_timesteps(50)[-1], 19)


def _teacher_args(tmp, steps, resume=False):
    return train_teacher.parse_args([
        "--steps", str(steps), "--subset", "200", "--batch-size", "8", "--channels", "16",
        "--out", os.path.join(tmp, "teacher.pt"), "--state", os.path.join(tmp, "state.pt"),
        "--save-every", "2", "--log-every", "2"] + (["--resume"] if resume else []))


class TrainingStagesTest(unittest.TestCase):
    def test_teacher_resume_is_bit_identical(self):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            train_teacher.train(_teacher_args(a, 4))
            train_teacher.train(_teacher_args(b, 2))
            os.remove(os.path.join(b, "teacher.pt"))
            train_teacher.train(_teacher_args(b, 4, resume=True))
            full, resumed = torch.load(os.path.join(a, "teacher.pt")), torch.load(
                os.path.join(b, "teacher.pt"))
            for part in ("unet", "text_encoder"):
                for key, value in full[part].items():
                    self.assertTrue(torch.equal(value, resumed[part][key]), key)

    def test_teacher_init_continues_and_freezes_the_text_encoder(self):
        """--init carries on from a checkpoint: steps add up, the batches are those an
        uninterrupted run draws next, and --freeze-text-encoder leaves every text encoder weight
        bit-identical while the UNet moves."""
        with tempfile.TemporaryDirectory() as tmp:
            train_teacher.train(_teacher_args(tmp, 2))
            first = torch.load(os.path.join(tmp, "teacher.pt"))

            def continued(name, *extra):
                out = os.path.join(tmp, name + ".pt")
                train_teacher.train(train_teacher.parse_args([
                    "--init", os.path.join(tmp, "teacher.pt"), "--steps", "3", "--subset",
                    "200", "--batch-size", "8", "--warmup", "1", "--out", out, "--state",
                    os.path.join(tmp, name + "_state.pt"), "--log-every", "1", *extra]))
                with open(os.path.join(tmp, name + ".json")) as f:
                    return torch.load(out), json.load(f)

            frozen, summary = continued("frozen", "--freeze-text-encoder")
            self.assertEqual(frozen["steps"], 5)
            self.assertEqual((summary["init_steps"], summary["run_steps"]), (2, 3))
            self.assertEqual(frozen["channels"], 16)  # the checkpoint's width, not the default
            for key, value in first["text_encoder"].items():
                self.assertTrue(torch.equal(value, frozen["text_encoder"][key]), key)
            self.assertTrue(any(not torch.equal(v, frozen["unet"][k])
                                for k, v in first["unet"].items()))
            trained, _ = continued("trained")
            self.assertTrue(any(not torch.equal(v, trained["text_encoder"][k])
                                for k, v in first["text_encoder"].items()))
            # Without the freeze the same run trains the text encoder too, so the UNets differ.
            self.assertTrue(any(not torch.equal(v, trained["unet"][k])
                                for k, v in frozen["unet"].items()))
            # The batches are those of total steps 2..4, as an uninterrupted run draws them.
            seeds, batch = [], common.TrainingSet.batch

            def recording(dataset, size, gen):
                seeds.append(gen.initial_seed())
                return batch(dataset, size, gen)

            with mock.patch.object(common.TrainingSet, "batch", recording), \
                    mock.patch.object(common, "lr_at", wraps=common.lr_at) as lr_at:
                continued("seeds", "--seed", "7")
            self.assertEqual(seeds, [7 * 1_000_003 + step for step in (2, 3, 4)])
            # --warmup reaches the schedule (lr_at caps it at steps/10 itself).
            self.assertEqual([c.args[3] for c in lr_at.call_args_list], [1, 1, 1])
            # The average starts at the checkpoint's with the full decay, no warm-up of its own:
            # at --ema 1 it never leaves the --init weights.
            kept, _ = continued("kept", "--ema", "1.0")
            for part in ("text_encoder", "unet"):
                for key, value in first[part].items():
                    self.assertTrue(torch.equal(value, kept[part][key]), key)

    def test_dmd_step_moves_generator_and_fake_score(self):
        with tempfile.TemporaryDirectory() as tmp:
            train_teacher.train(_teacher_args(tmp, 1))
            args = train_dmd.parse_args([
                "--teacher", os.path.join(tmp, "teacher.pt"), "--steps", "1", "--subset", "200",
                "--batch-size", "4", "--fake-steps", "2", "--eval-every", "0"])
            d = train_dmd.Distiller(args)
            dataset = common.TrainingSet(200)
            before_g = [p.detach().clone() for p in d.generator.parameters()]
            before_f = [p.detach().clone() for p in d.fake.parameters()]
            teacher = [p.detach().clone() for p in d.teacher.parameters()]
            metrics = d.step(dataset, 0)
            self.assertTrue(all(torch.isfinite(torch.tensor(v)) for v in metrics.values()))
            self.assertTrue(any(not torch.equal(a, b)
                                for a, b in zip(before_g, d.generator.parameters())))
            self.assertTrue(any(not torch.equal(a, b)
                                for a, b in zip(before_f, d.fake.parameters())))
            # The real score (teacher) is frozen.
            self.assertTrue(all(torch.equal(a, b) for a, b in zip(teacher, d.teacher.parameters())))

    def test_gan_head_reaches_generator_and_learns_real_from_fake(self):
        """--gan-weight adds DMD2's head: its loss changes G's update, the head and the fake score
        learn, the teacher stays frozen, and the head survives --out / --init."""
        with tempfile.TemporaryDirectory() as tmp:
            train_teacher.train(_teacher_args(tmp, 1))
            flags = ["--teacher", os.path.join(tmp, "teacher.pt"), "--subset", "200",
                     "--batch-size", "4", "--fake-steps", "2", "--eval-every", "0"]
            dataset = common.TrainingSet(200)

            def distiller(*extra):  # same seed: same initial weights (the head's included)
                torch.manual_seed(0)
                return train_dmd.Distiller(train_dmd.parse_args(flags + list(extra)))

            def one_step(*extra):
                d = distiller(*extra)
                return d, d.step(dataset, 0)

            plain, plain_metrics = one_step()
            self.assertIsNone(plain.head)
            self.assertNotIn("gan_g", plain_metrics)
            # The GAN draws from its own random stream, so with --gan-fake-weight 0 the fake
            # score's updates are the plain run's and G differs by the GAN loss alone.
            g_only, _ = one_step("--gan-weight", "1", "--gan-fake-weight", "0")
            self.assertTrue(all(torch.equal(a, b) for a, b in
                                zip(plain.fake.parameters(), g_only.fake.parameters())))
            self.assertTrue(any(not torch.equal(a, b) for a, b in
                                zip(plain.generator.parameters(), g_only.generator.parameters())))
            gan, metrics = one_step("--gan-weight", "1", "--gan-fake-weight", "1")
            for key in ("gan_g", "gan_d", "logit_real", "logit_fake"):
                self.assertTrue(torch.isfinite(torch.tensor(metrics[key])), key)
            head_before = [p.detach().clone()
                           for p in distiller("--gan-weight", "1").head.parameters()]
            self.assertTrue(any(not torch.equal(a, b)
                                for a, b in zip(head_before, gan.head.parameters())))
            self.assertTrue(any(not torch.equal(a, b) for a, b in
                                zip(plain.fake.parameters(), gan.fake.parameters())))
            self.assertTrue(all(torch.equal(a, b) for a, b in
                                zip(plain.teacher.parameters(), gan.teacher.parameters())))
            # A few more head updates on the same real/fake batch separate the logits.
            dev = gan.device
            gen = torch.Generator().manual_seed(1)
            x0_fake = torch.randn((4, 4, 8, 8), generator=gen) * 3
            emb = gan.text_encoder(dataset.batch(4, gen, dropout=0.0)[1])
            losses = []
            for _ in range(30):
                loss, _, _ = gan.discriminator_loss(dataset, torch.Generator().manual_seed(2),
                                                    x0_fake.to(dev), emb)
                gan.opt_d.zero_grad()
                gan.opt_f.zero_grad()
                loss.backward()
                gan.opt_d.step()
                losses.append(loss.item())
            self.assertLess(losses[-1], 0.8 * losses[0])
            # The exported checkpoint carries the head; --init restores it.
            out = os.path.join(tmp, "dmd.pt")
            train_dmd.train(train_dmd.parse_args(flags + [
                "--gan-weight", "1", "--steps", "1", "--state", os.path.join(tmp, "s.pt"),
                "--out", out]))
            saved = torch.load(out)["gan_head"]
            restored = train_dmd.Distiller(train_dmd.parse_args(
                flags + ["--gan-weight", "1", "--init", out]))
            for key, value in restored.head.state_dict().items():
                self.assertTrue(torch.equal(value, saved[key].float()), key)

    def test_resume_takes_the_new_learning_rate(self):
        """A continuation may change the recipe: --lr and --beta1 of the resuming run replace
        the values stored in the optimizer states."""
        with tempfile.TemporaryDirectory() as tmp:
            train_teacher.train(_teacher_args(tmp, 1))
            state = os.path.join(tmp, "dmd_state.pt")

            def run(steps, *extra):
                train_dmd.train(train_dmd.parse_args([
                    "--teacher", os.path.join(tmp, "teacher.pt"), "--subset", "200",
                    "--batch-size", "4", "--fake-steps", "1", "--eval-every", "0",
                    "--steps", str(steps), "--state", state, "--save-every", "1",
                    "--out", os.path.join(tmp, "dmd.pt"), "--resume", *extra]))
                saved = torch.load(state)
                return [(g["lr"], g["betas"][0]) for opt in ("opt_g", "opt_f")
                        for g in saved[opt]["param_groups"]]

            self.assertEqual(run(1, "--lr", "1e-4"), [(1e-4, 0.9)] * 2)
            self.assertEqual(run(2, "--lr", "3e-4", "--beta1", "0.5"), [(3e-4, 0.5)] * 2)
            # --warmup: step k (from 0) of the run trains at lr * (k + 1) / warmup.
            warm = run(3, "--lr", "4e-4", "--warmup", "8")
            self.assertEqual(len(warm), 2)
            for lr, beta1 in warm:
                self.assertAlmostEqual(lr, 1.5e-4, places=12)
                self.assertEqual(beta1, 0.9)

    def test_init_continues_the_step_count(self):
        """A run from --init counts its steps after the checkpoint's: dmd.pt's steps are the
        total, and the summary's init_steps places its curve after the first run's."""
        with tempfile.TemporaryDirectory() as tmp:
            train_teacher.train(_teacher_args(tmp, 1))

            def run(name, steps, *extra):
                train_dmd.train(train_dmd.parse_args([
                    "--teacher", os.path.join(tmp, "teacher.pt"), "--subset", "200",
                    "--batch-size", "4", "--fake-steps", "1", "--eval-every", "0",
                    "--steps", str(steps), "--state", os.path.join(tmp, name + "_state.pt"),
                    "--out", os.path.join(tmp, name + ".pt"), *extra]))
                with open(os.path.join(tmp, name + ".json")) as f:
                    return torch.load(os.path.join(tmp, name + ".pt"))["steps"], json.load(f)

            steps, summary = run("first", 2)
            self.assertEqual((steps, summary["init_steps"]), (2, 0))
            steps, summary = run("second", 3, "--init", os.path.join(tmp, "first.pt"))
            self.assertEqual((steps, summary["init_steps"]), (5, 2))
            self.assertEqual(summary["curve"][-1][0], 3)

    def test_pairs_files_concatenate_and_heldout_loss(self):
        """--pairs takes several files (refusing ones from another sampler or with the same
        noise); --heldout-pairs gives G's regression loss on pairs it never trained on."""
        with tempfile.TemporaryDirectory() as tmp:
            train_teacher.train(_teacher_args(tmp, 1))

            def pairs(name, seed, count=6, steps=2):
                path = os.path.join(tmp, name)
                subprocess.run([sys.executable, "-m", "training.make_ode_pairs", "--teacher",
                                os.path.join(tmp, "teacher.pt"), "--count", str(count),
                                "--steps", str(steps), "--seed", str(seed), "--out", path],
                               check=True, cwd=REPO, stdout=subprocess.DEVNULL)
                return path

            a, b, c = pairs("a.pt", 1), pairs("b.pt", 2, count=4), pairs("c.pt", 3)
            merged = train_dmd.load_pairs(f"{a},{b}")
            first, second = torch.load(a), torch.load(b)
            for key in ("noise", "ids", "labels", "x0"):
                self.assertTrue(torch.equal(merged[key], torch.cat([first[key], second[key]])))
            with self.assertRaisesRegex(SystemExit, "share 6 noise samples"):
                train_dmd.load_pairs(f"{a},{a}")
            with self.assertRaisesRegex(SystemExit, "steps 3"):
                train_dmd.load_pairs(f"{a},{pairs('d.pt', 4, steps=3)}")
            flags = ["--teacher", os.path.join(tmp, "teacher.pt"), "--subset", "200",
                     "--batch-size", "4", "--eval-every", "0", "--pairs", f"{a},{b}"]
            with self.assertRaisesRegex(SystemExit, "share 4 noise samples"):
                train_dmd.Distiller(train_dmd.parse_args(flags + ["--heldout-pairs", b]))
            d = train_dmd.Distiller(train_dmd.parse_args(flags + ["--heldout-pairs", c]))
            # Targets made by G itself: zero loss; shifted by 0.1: 0.01.
            with torch.no_grad():
                own = d.generate(d.heldout["noise"], d.text_encoder(d.heldout["ids"]))
            d.heldout["x0"] = own
            self.assertLess(d.heldout_loss(batch_size=4), 1e-10)
            d.heldout["x0"] = own + 0.1
            self.assertAlmostEqual(d.heldout_loss(batch_size=4), 0.01, places=5)

    def test_sampling_loop_matches_reference_pipeline(self):
        """common.sample (used for ODE pairs and monitoring) is the loop the server runs: compare
        with tools/reference_pipeline.py on an exported 3-step CFG bundle."""
        with tempfile.TemporaryDirectory() as tmp:
            train_teacher.train(_teacher_args(tmp, 1))
            bundle = os.path.join(tmp, "bundle")
            subprocess.run([sys.executable, "-m", "training.export_fashion_bundle",
                            "--checkpoint", os.path.join(tmp, "teacher.pt"), "--name", "t",
                            "--steps", "3", "--guidance", "2.5", "--out", bundle],
                           check=True, cwd=REPO)
            ids = captions.tokenize(["a sandal", "a dress"])
            inputs = json.dumps([{"input_ids": ids[i].tolist(), "seed": 7 + i} for i in range(2)])
            subprocess.run([sys.executable, "-m", "tools.reference_pipeline",
                            "--bundle", bundle, "--inputs-json", inputs,
                            "--out", os.path.join(tmp, "ref.raw")], check=True, cwd=REPO)
            with open(os.path.join(tmp, "ref.raw"), "rb") as f:
                reference = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            text_encoder, unet = train_teacher.load_checkpoint(os.path.join(tmp, "teacher.pt"))
            noise = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s))
                                 for s in (7, 8)])
            x0 = common.sample(unet, text_encoder, ids, noise, 3, 2.5, t2i.Schedule(),
                               captions.tokenize([""])[0])
            dataset_decoder = torch.jit.load(os.path.join(bundle, "decoder.pt"))
            with open(os.path.join(bundle, "model.json")) as f:
                scale = json.load(f)["latent_scaling_factor"]
            ours = common.to_uint8(dataset_decoder(x0 / scale)).permute(0, 2, 3, 1).flatten()
            diff = (ours.int() - reference.int()).abs().max().item()
            self.assertLessEqual(diff, 1)


if __name__ == "__main__":
    unittest.main()
