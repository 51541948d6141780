"""A real Hugging Face model through fit: a tiny BERT built from a config (nothing is
downloaded), fed by HF's DataCollatorWithPadding, with the README's forward as written.
Skipped, saying so, when transformers is not installed (.ci/run installs it)."""
import os
import re
import tempfile
import unittest

import torch

import loops

try:
    import transformers
except ImportError:
    transformers = None

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["good", "bad", "fine", "poor", "the", "a", "film", "plot", "was", "very", "not"]


def readme_forward():
    """The README's Hugging Face recipe: its forward, run as written."""
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    block = re.search(r"```python\n(# A Hugging Face model.*?)```", text, re.S).group(1)
    names = {}
    exec(block.split("loops.fit(")[0], names)
    return names["forward"]


@unittest.skipIf(transformers is None, "transformers is not installed (.ci/run installs it)")
class HuggingFaceTest(unittest.TestCase):
    def parts(self, where):
        """A tiny BertForSequenceClassification (seeded), and a DataLoader of tokenized
        sentences of several lengths, padded per batch by DataCollatorWithPadding."""
        vocab = os.path.join(where, "vocab.txt")
        with open(vocab, "w") as f:
            f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
        tokenizer = transformers.BertTokenizer(vocab_file=vocab)
        g = torch.Generator().manual_seed(0)
        rows = []
        for _ in range(96):
            words = [WORDS[i] for i in torch.randint(2, len(WORDS), (int(torch.randint(
                3, 9, (1,), generator=g)),), generator=g)]
            label = int(torch.rand(1, generator=g) < 0.5)
            words.insert(int(torch.randint(0, len(words), (1,), generator=g)), WORDS[label])
            rows.append({**tokenizer(" ".join(words)), "labels": label})
        loader = torch.utils.data.DataLoader(
            rows, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1),
            collate_fn=transformers.DataCollatorWithPadding(tokenizer))
        config = transformers.BertConfig(vocab_size=5 + len(WORDS), hidden_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=32)
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(config), loader

    def test_a_tiny_bert_trains_in_bf16_with_accumulation_and_resumes_exactly(self):
        forward, seen = readme_forward(), set()

        def watching(model, batch):
            seen.add(type(batch).__name__)
            return forward(model, batch)

        def run(epochs, d):
            model, loader = self.parts(d)
            h = loops.fit(model, loader, None, torch.optim.AdamW(model.parameters(), 3e-3),
                          epochs=epochs, forward=watching, precision="bf16", accumulate=2,
                          val=loader, metrics={"acc": "accuracy"}, checkpoint=d,
                          resume=True, seed=0, verbose=0)
            return model, h
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            whole, h = run(3, a)
            run(1, b)  # stopped after its first epoch, then resumed to the third
            resumed, h_resumed = run(3, b)
        self.assertEqual(seen, {"BatchEncoding"})  # HF's batches, as the collator gives them
        self.assertLess(h["loss"][-1], h["loss"][0])
        self.assertEqual({k: v for k, v in h.items() if k != "time"},
                         {k: v for k, v in h_resumed.items() if k != "time"})
        for (k, v), w in zip(whole.state_dict().items(), resumed.state_dict().values()):
            self.assertTrue(torch.equal(v, w), k)


if __name__ == "__main__":
    unittest.main()
