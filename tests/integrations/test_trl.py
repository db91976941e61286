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


def test_trl_options_the_rpg_loss_does_not_apply_are_refused(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    from rpg.integrations.trl import RPGGRPOTrainer

    tokenizer = _tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, max_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                      top_entropy_quantile=0.5)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        RPGGRPOTrainer(loss=rpg.DAPOLoss(), model=_model(len(tokenizer)), reward_funcs=count_a, args=args,
                       train_dataset=Dataset.from_dict({"prompt": ["abc"] * 4}), processing_class=tokenizer)


@pytest.mark.parametrize(
    "loss_type,loss",
    [("dapo", rpg.DAPOLoss()), ("grpo", rpg.GRPOLoss(beta=0.0, clip=rpg.Clip(0.2, 0.28, dual=None))),
     ("dr_grpo", rpg.DrGRPOLoss(6, clip=rpg.Clip(0.2, 0.28, dual=None)))],
)
def test_same_loss_as_trls_own_on_the_same_inputs(tmp_path, loss_type, loss):
    """The preset inside RPGGRPOTrainer gives TRL's own loss for the matching loss_type (normalisation included)."""
    import collections

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rpg.integrations.trl import RPGGRPOTrainer

    tokenizer = _tokenizer()
    dataset = Dataset.from_dict({"prompt": ["abc", "hgf"] * 8})

    def make(cls, **kw):
        args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=6, max_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                          seed=0, beta=0.0, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28,
                          gradient_accumulation_steps=2)
        trainer = cls(model=_model(len(tokenizer)), reward_funcs=count_a, args=args, processing_class=tokenizer,
                      train_dataset=dataset, **kw)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 2
        trainer._metrics = {"train": collections.defaultdict(list)}
        return trainer

    theirs, ours = make(GRPOTrainer), make(RPGGRPOTrainer, loss=loss)
    ours.model.load_state_dict(theirs.model.state_dict())
    g = torch.Generator().manual_seed(0)
    b, p, c = 4, 3, 6
    inputs = dict(prompt_ids=torch.randint(2, 11, (b, p), generator=g), prompt_mask=torch.ones(b, p, dtype=torch.long),
                  completion_ids=torch.randint(2, 11, (b, c), generator=g),
                  completion_mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 6]),
                  advantages=torch.randn(b, generator=g), num_items_in_batch=torch.tensor(40.0))
    with torch.no_grad():
        logp = theirs._get_per_token_logps_and_entropies(
            theirs.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), c)[0]
    inputs["old_per_token_logps"] = logp + 0.1 * torch.randn(b, c, generator=g)  # off-policy: clips bind
    want, got = theirs._compute_loss(theirs.model, inputs), ours._compute_loss(ours.model, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
