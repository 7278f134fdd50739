"""labutils.scripts.run_labs.output_problems: the check `make run` applies to every executed notebook (issue 13:
no TqdmWarning, no warning or traceback text in an executed lab). Made-up notebooks: no kernel is started."""

from labutils.scripts import run_labs


def nb(*outputs):
    return {"cells": [{"cell_type": "markdown", "source": "Warning: prose may say this"},
                      {"cell_type": "code", "outputs": list(outputs)}]}


def stream(text, name="stderr"):
    return {"output_type": "stream", "name": name, "text": text}


def test_clean_outputs_pass():
    clean = nb(stream("searched all 8 shapes\n", "stdout"), {"output_type": "execute_result",
               "data": {"text/plain": "shape search: 100%|##| 8/8"}}, stream("  0%|  | 0/5 [00:00<?, ?it/s]"))
    assert run_labs.output_problems(clean) == []


def test_warnings_and_tracebacks_are_found_with_their_cell():
    tqdm = "/x/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update jupyter and ipywidgets.\n"
    err = {"output_type": "error", "ename": "ValueError", "evalue": "bad", "traceback": ["Traceback (most recent "
           "call last):", "  File x"]}
    found = run_labs.output_problems(nb(stream(tqdm), err, stream("UserWarning: casting\n", "stdout"),
                                        {"output_type": "display_data", "data": {"text/plain": ["WARNING x\n"]}}))
    assert len(found) == 4 and all(f.startswith("cell 1: ") for f in found)
    assert "TqdmWarning" in found[0] and "Traceback" in found[1] and "UserWarning" in found[2]


def test_a_number_or_word_containing_warning_is_not_flagged():
    assert run_labs.output_problems(nb(stream("no warnings here; forewarning text, Warnings: 0 \n", "stdout"))) == []
