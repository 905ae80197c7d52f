"""The prompts personalization trains on: Textual Inversion's object templates (Gal et al. 2022), which
the paper uses, filled with "[V] robot" (or "[V]" alone for the no-class-word ablation)."""

OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)


def subject_words(placeholder: str, class_name: str | None) -> str:
    return f"{placeholder} {class_name}" if class_name else placeholder


def training_prompt(index: int, placeholder: str, class_name: str | None) -> str:
    return OBJECT_TEMPLATES[index % len(OBJECT_TEMPLATES)].format(subject_words(placeholder, class_name))
