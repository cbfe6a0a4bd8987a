"""In-process evaluation used during training (curves and model selection): generate images with
the Python sampling loop, classify them with the committed classifier and compare with the real
test set. The reported numbers of the finished models come from images made by the server
(training/evaluate_served.py); this is for monitoring only."""

import torch

from training import captions, common, t2i
from training.eval import classifier as clf
from training.eval import fashion_data, metrics

CLASSIFIER_CHECKPOINT = "training/checkpoints/classifier.pt"


class QuickEval:
    """Holds the classifier and the real test-set features. `per_class` images per class, the
    prompt phrasing cycling over the class's captions, seeds 0..N-1."""

    def __init__(self, decoder, scaling_factor, per_class=100, subset_test=0):
        self.decoder = decoder.eval()
        self.scaling_factor = scaling_factor
        self.classifier = clf.load_classifier(CLASSIFIER_CHECKPOINT)
        test_images, test_labels = fashion_data.load_split("test")
        if subset_test:
            test_images, test_labels = test_images[:subset_test], test_labels[:subset_test]
        self.real_labels = test_labels
        _, self.real_features = clf.embed_images(self.classifier, test_images)
        self.real_mean_pixel = float(test_images.mean())
        self.labels = torch.arange(10).repeat_interleave(per_class)
        phrasing = torch.arange(len(self.labels)) % 7
        self.ids = captions.tokenize([captions.CAPTIONS[int(c)][int(p)]
                                      for c, p in zip(self.labels, phrasing)])
        gen = torch.Generator().manual_seed(1234)
        self.noise = torch.randn((len(self.labels), t2i.LATENT_CHANNELS, 8, 8), generator=gen)
        self.empty_ids = captions.tokenize([""])[0]
        self.schedule = t2i.Schedule()

    @torch.no_grad()
    def images(self, unet, text_encoder, steps, guidance, batch_size=250):
        out = []
        for i in range(0, len(self.labels), batch_size):
            x0 = common.sample(unet, text_encoder, self.ids[i:i + batch_size],
                               self.noise[i:i + batch_size], steps, guidance, self.schedule,
                               self.empty_ids)
            out.append(common.to_uint8(self.decoder(x0 / self.scaling_factor))[:, 0])
        return torch.cat(out)

    def evaluate(self, unet, text_encoder, steps=1, guidance=1.0):
        images = self.images(unet, text_encoder, steps, guidance)
        logits, features = clf.embed_images(self.classifier, images)
        labels = self.labels.numpy()
        return {
            "fid": metrics.frechet_distance(features, self.real_features),
            "class_accuracy": metrics.class_accuracy(logits.argmax(1), labels),
            "diversity_ratio": metrics.diversity_ratio(features, labels, self.real_features,
                                                       self.real_labels)["mean"],
            "mean_pixel": float(images.float().mean()),
            "real_mean_pixel": self.real_mean_pixel,
        }
