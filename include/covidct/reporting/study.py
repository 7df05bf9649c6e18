"""The study we reproduce: Benbrahim et al. (2021), its figures and how ours are held against them."""

from __future__ import annotations

#: Benbrahim et al. (2021): random 70/30 split, 216 test images, a 2-core Spark driver.
PAPER_CITATION = (
    "Benbrahim et al. (2021), Deep Transfer Learning Pipelines with Apache Spark "
    "and Keras TensorFlow combined with Logistic Regression to Detect COVID-19 in Chest CT Images"
)
PAPER_TEST_IMAGES = 216
PAPER = {
    "VGG16": {"accuracy": 0.8565, "correct": 185, "fit_min": 16.1, "evaluate_min": 14.2},
    "VGG19": {"accuracy": 0.8426, "correct": 182, "fit_min": 20.3, "evaluate_min": 17.6},
    "Xception": {"accuracy": 0.8287, "correct": 179, "fit_min": 12.4, "evaluate_min": 10.5},
}
#: What an ensemble is held against: the study's best figure (VGG16's 85.65 %).
STUDY_BEST = "VGG16"


def paper_cell(entry) -> tuple[str, str]:
    """(figure, remark) for the study's accuracy beside a report row (``covidct.reporting.comparison.Entry``)."""
    paper = PAPER.get(entry.backbone)
    if paper is None:
        return "—", ""
    figure = f"{100 * paper['accuracy']:.2f} ({paper['correct']}/{PAPER_TEST_IMAGES})"
    if entry.split != "random70":
        return figure, "different protocol"
    interval = entry.interval("accuracy")
    if interval is None or interval.low is None:
        return figure, ""
    return figure, "inside our 95 % CI" if interval.brackets(paper["accuracy"]) else "outside our 95 % CI"
