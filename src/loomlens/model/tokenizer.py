"""Build the tiny Florence-2 tokenizer offline: byte-level BPE + `<loc_N>` + task tokens.

Florence-2 uses BART's 50k byte-level BPE vocabulary, which cannot be downloaded here. The
tiny model needs only the words of its own tasks, so loomlens trains a small byte-level BPE on
its own text (task prompts, class names, caption templates, a generic vocabulary) with the
`tokenizers` library, adds the 1000 location tokens, and wraps it as a standard
`BartTokenizer`, so that `AutoTokenizer.from_pretrained(folder)` loads it without loomlens.
Byte-level BPE can still spell any UTF-8 text, so a user's own class names always encode.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

#: BART's special tokens, in BART's id order (bos=0, pad=1, eos=2, unk=3).
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
IMAGE_TOKEN = "<image>"
NUM_LOC_TOKENS = 1000
LOC_TOKENS = [f"<loc_{i}>" for i in range(NUM_LOC_TOKENS)]
#: Florence-2's own extra markers (polygons, separators) and task tokens, kept as single tokens.
EXTRA_TOKENS = [
    "<poly>", "</poly>", "<sep>", "<OD>", "<CAPTION>", "<DETAILED_CAPTION>",
    "<MORE_DETAILED_CAPTION>", "<DENSE_REGION_CAPTION>", "<CAPTION_TO_PHRASE_GROUNDING>",
    "<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>",
    "<OPEN_VOCABULARY_DETECTION>", "<REGION_TO_CATEGORY>", "<REGION_TO_DESCRIPTION>",
    "<REGION_TO_OCR>", "<OCR>", "<OCR_WITH_REGION>", "<REGION_PROPOSAL>",
]

# The natural-language prompts Florence2Processor substitutes for the task tokens.
_PROMPTS = [
    "What is the text in the image?", "What is the text in the image, with regions?",
    "What does the image describe?", "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "Locate the objects with category name in the image.",
    "Locate the objects in the image, with their descriptions.",
    "Locate the region proposals in the image.", "Locate the phrases in the caption:",
    "Locate in the image with mask", "What is the polygon mask of region",
    "Locate in the image.", "What is the region?", "What does the region describe?",
    "What text is in the region?",
]
_CLASS_WORDS = (
    "wrinkle drop broken-weft broken weft hole stain knot slub fold crease thread defect "
    "spot line band ring square circle triangle cross bar blob stripe dot rectangle ellipse "
    "star patch mark scratch tear gap"
)
_COLOURS = "red green blue yellow orange purple white black grey gray dark light bright pale"
_GENERIC = (
    "a an the of with and on in at to is are there one two three four five six seven eight "
    "nine ten no none small large big long short thin thick wide narrow left right top bottom "
    "centre center middle near far above below image picture photo frame camera view fabric "
    "cloth woven textile loom machine surface texture background pattern plain striped "
    "checked shape shapes object objects region regions defects free clean several many "
    "some each this that it its has have shows showing laid out cutting mat table under "
    "over across along corner edge side horizontal vertical diagonal timestamp text number"
)
_TEMPLATES = [
    "woven fabric with {n} {c} defects.", "defect-free woven fabric.",
    "a {col} {c} on a {col} background.", "an image with {n} {c} shapes.",
    "there is a {c} in the {pos} of the image.", "fabric with {c}.",
]


def tokenizer_corpus(class_names: Iterable[str] = ()) -> list[str]:
    """Return the text the tiny BPE is trained on: prompts, classes, captions, generic words."""
    classes = _CLASS_WORDS.split() + list(class_names)
    lines = list(_PROMPTS)
    lines += [" ".join(classes), _COLOURS, _GENERIC, "0 1 2 3 4 5 6 7 8 9 10 11 12 2024 2025 2026"]
    # Answers put a label straight after a <loc_N> or <s>, with no space before it, and byte-level
    # BPE learns "Ġbroken" and "broken" apart: each word also stands alone, unprefixed, so a
    # label is a few whole-word tokens ("broken-weft": 3, not 5 fragments).
    lines += classes + _COLOURS.split() + _GENERIC.split()
    for template in _TEMPLATES:
        for c in classes:
            for col, n, pos in (("red", "two", "left"), ("dark", "three", "top"), ("white", "one", "centre")):
                lines.append(template.format(c=c, col=col, n=n, pos=pos))
    # Repeat the word lists so that whole words become single tokens.
    return lines * 4


def build_tokenizer(vocab_size: int = 2048, class_names: Iterable[str] = ()):
    """Train the tiny byte-level BPE and wrap it as a `transformers.BartTokenizer`.

    Returns a tokenizer with BART's special tokens, `<image>`, `<loc_0>`..`<loc_999>` and the
    Florence-2 task tokens, whose `image_token`/`image_token_id` attributes the native
    `Florence2Processor` needs.
    """
    from transformers import BartTokenizer

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(tokenizer_corpus(class_names), trainer=trainer)
    core.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    # Location and task tokens are ordinary (non-special) added tokens: decoding with
    # skip_special_tokens=True must keep them, since they *are* the answer.
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in LOC_TOKENS + EXTRA_TOKENS])
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", core.token_to_id("<s>")), ("</s>", core.token_to_id("</s>"))],
    )
    return BartTokenizer(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=1024,
    )


def loc_token_ids(tokenizer) -> list[int]:
    """Ids of `<loc_0>`..`<loc_999>` in order."""
    ids = tokenizer.convert_tokens_to_ids(LOC_TOKENS)
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError("tokenizer has no <loc_N> tokens: it is not a Florence-2 tokenizer")
    return ids
