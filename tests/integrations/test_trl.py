"""rpg.integrations.trl: real GRPOTrainer steps on CPU with a tiny random LM and a character tokenizer."""

import math

import pytest
import torch

pytest.importorskip("trl", reason="the trl extra is not installed")

import rpg  # noqa: E402

ALPHABET = "abcdefgh "


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(ALPHABET)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def _model(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(config)


def count_a(completions, **kwargs):
    """Rule-based reward: the share of 'a' characters in the completion."""
    return [c.count("a") / max(len(c), 1) for c in completions]


@pytest.mark.parametrize("loss", [rpg.RPGLoss("urkl", style="reinforce", beta=1e-3), rpg.GRPOLoss(beta=0.0)],
                         ids=["rpg-urkl-reinforce", "grpo"])
def test_grpo_trainer_trains_with_an_rpg_loss(tmp_path, loss):
    from datasets import Dataset
    from trl import GRPOConfig

    from rpg.integrations.trl import RPGGRPOTrainer

    tokenizer = _tokenizer()
    model = _model(len(tokenizer))
    before = [p.detach().clone() for p in model.parameters()]
    dataset = Dataset.from_dict({"prompt": ["abc", "hgf", "bad", "fed"] * 4})
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=2, num_iterations=2, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", seed=0, beta=0.0, bf16=False, fp16=False,
    )
    trainer = RPGGRPOTrainer(loss=loss, model=model, reward_funcs=count_a, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    trainer.train()
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert changed, "the optimizer steps did not change the parameters"
    logged = [h for h in trainer.state.log_history if any(k.startswith("rpg/") for k in h)]
    assert logged, trainer.state.log_history
    for entry in logged:
        for key in ("rpg/ratio/mean", "rpg/clip_frac", "rpg/kl/old_k1"):
            assert key in entry and math.isfinite(entry[key])


def test_loss_must_be_an_rpg_loss():
    from rpg.integrations.trl import RPGGRPOTrainer

    with pytest.raises(TypeError, match="rpg loss"):
        RPGGRPOTrainer(loss=lambda *a: None, model=None)
