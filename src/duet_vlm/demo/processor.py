"""Word-level tokenizer and ``LlavaProcessor`` for the demo model.

``build_tokenizer()`` -> ``PreTrainedTokenizerFast`` (WordLevel over :func:`duet_vlm.synthetic.vocabulary`
plus ``<pad> <s> </s> <unk> <image>``; lower-case normaliser; whitespace + punctuation
pre-tokeniser; ``<s>`` prepended to every encoded text, left padding).

``build_processor()`` -> ``transformers.LlavaProcessor`` with a CLIP image processor (336 px,
OpenAI CLIP mean/std) that expands ``<image>`` into 576 image tokens, exactly like llava-hf's
llava-1.5 processors, and a chat template producing ``"USER: <image>\\n{question} ASSISTANT:"``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import LlavaProcessor, PreTrainedTokenizerFast

from .. import synthetic

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD, BOS, EOS, UNK, IMAGE = SPECIAL_TOKENS

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Same structure as the llava-hf llava-1.5 chat template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def prompt(question: str) -> str:
    """The single-turn prompt the demo model was trained on (same as the chat template)."""
    return f"USER: <image>\n{question} ASSISTANT:"


def build_tokenizer(special: list[str] = SPECIAL_TOKENS, extra: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """The word-level tokenizer: ``special`` tokens first (ids 0, 1, ...), then the benchmark's words;
    ``extra``: the named special tokens (the LLaVA processor's ``image_token``, Qwen's four)."""
    vocab = {tok: i for i, tok in enumerate(special)}
    for w in synthetic.vocabulary():
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(special)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=extra if extra is not None else {"image_token": IMAGE},
        padding_side="left",
        model_max_length=2048,
    )
    return fast


def build_image_processor():
    kwargs = dict(
        size={"shortest_edge": synthetic.IMAGE_SIZE},
        crop_size={"height": synthetic.IMAGE_SIZE, "width": synthetic.IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    try:  # the torchvision backend needs torchvision; fall back to the PIL backend.
        import torchvision  # noqa: F401
        from transformers import CLIPImageProcessor as cls
    except Exception:  # pragma: no cover - depends on the environment
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    return cls(**kwargs)


def build_processor() -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=synthetic.PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy -> 576
    )
