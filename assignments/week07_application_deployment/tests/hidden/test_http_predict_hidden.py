"""Task http_predict: POST /predict answers each known image with the model's label and probabilities."""

from __future__ import annotations

import reference
import served

from common.grading.client import Submission

# The model scores 1.0 on these 32 images (top-two margins above 0.9), chance is 1/4: any wiring bug (pixels
# transposed, classes misnamed, a label not the most probable class) falls far below 0.9.
MIN_ACCURACY = 0.9


def test_every_known_image_gets_the_models_answer(submission: Submission, model, known) -> None:
    model_file, centroids = model
    expected = reference.expected_probabilities([png for png, _ in known], centroids)
    with served.running(submission, model_file) as server:
        responses = [server.predict(png) for png, _ in known]
    labels = []
    for i, (response, want) in enumerate(zip(responses, expected, strict=True)):
        assert response.status_code == 200, (
            f"image {i}: POST /predict answered {response.status_code}, expected 200"
        )
        labels.append(served.check_answer(response.json(), want, f"image {i}"))
    names = list(expected[0])
    accuracy = sum(label == names[truth] for label, (_, truth) in zip(labels, known, strict=True)) / len(
        known
    )
    assert accuracy >= MIN_ACCURACY, f"accuracy {accuracy:.2f} on the known images is below {MIN_ACCURACY}"
