"""Which lines of a screenshot become the question."""

from supportqa_server.ocr import TextLine, question_text


def line(text: str) -> TextLine:
    return TextLine(text=text, confidence=0.9, left=0, top=0)


def test_chrome_lines_are_dropped_when_a_sentence_exists():
    lines = [line("12:41"), line("Send feedback"),
             line("Why was my card payment declined today"), line("Cancel"), line("Send")]
    assert question_text(lines) == "Why was my card payment declined today"


def test_all_short_lines_are_kept_when_there_is_no_sentence():
    lines = [line("ORGANIC"), line("Oat milk"), line("1 L")]
    assert question_text(lines) == "ORGANIC\nOat milk\n1 L"
