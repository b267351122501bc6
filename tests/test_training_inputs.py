"""Prompt List and Edit Pairs read only what a ComfyUI user may read: files and folders in ComfyUI's input folder."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def input_dir(host) -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory())


def write_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((64, 80, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i:02}.png")


def test_prompt_file_is_read_from_the_input_folder(host, input_dir):
    (input_dir / "prompts").mkdir(exist_ok=True)
    (input_dir / "prompts" / "train.txt").write_text("a red fox\n# a comment\na blue lake\n", encoding="utf-8")
    items = host.node("UniPic2PromptList").make("a green tree", "prompts/train.txt")[0]
    assert [item.prompt for item in items] == ["a green tree", "a red fox", "a blue lake"]


@pytest.mark.parametrize("path", ["/etc/passwd", "../../../../../../etc/passwd", "prompts/../../escape.txt"])
def test_prompt_file_outside_the_input_folder_is_refused(host, path):
    with pytest.raises(ValueError, match="'file' is .* outside ComfyUI's input folder; put it in"):
        host.node("UniPic2PromptList").make("a red fox", path)


def test_a_link_out_of_the_input_folder_is_refused(host, input_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the server's users\n")
    (input_dir / "innocent.txt").unlink(missing_ok=True)
    (input_dir / "innocent.txt").symlink_to(secret)
    with pytest.raises(ValueError, match="outside ComfyUI's input folder"):
        host.node("UniPic2PromptList").make("", "innocent.txt")
    outside = tmp_path / "pictures"
    write_images(outside, 1)
    (input_dir / "linked_pictures").unlink(missing_ok=True)
    (input_dir / "linked_pictures").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="'folder' is 'linked_pictures', which is outside"):
        host.node("UniPic2EditPairs").make("make it snow", folder="linked_pictures")
    inside = input_dir / "pictures_with_a_link"
    write_images(inside, 1)
    (inside / "01.png").unlink(missing_ok=True)
    (inside / "01.png").symlink_to(outside / "00.png")
    with pytest.raises(ValueError, match=r"image '.*01.png' links to '.*00.png', outside .*copy the image itself"):
        host.node("UniPic2EditPairs").make("make it snow\nadd a boat", folder="pictures_with_a_link")


def test_a_prompt_file_that_is_not_utf8_is_named(host, input_dir):
    (input_dir / "latin1.txt").write_bytes("une pomme rouge, très mûre\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"prompt file '.*latin1.txt' is not UTF-8 text .*save it as UTF-8"):
        host.node("UniPic2PromptList").make("", "latin1.txt")


def test_edit_pairs_read_a_folder_in_the_input_folder(host, input_dir):
    write_images(input_dir / "edit_sources", 2)
    pairs = host.node("UniPic2EditPairs").make("make it snow\nadd a boat", folder="edit_sources")[0]
    assert [p.prompt for p in pairs] == ["make it snow", "add a boat"]
    assert pairs[1].source.shape == (64, 80, 3) and abs(pairs[1].source.mean().item() - 40 / 255) < 1e-6
    with pytest.raises(ValueError, match="outside ComfyUI's input folder"):
        host.node("UniPic2EditPairs").make("make it snow", folder="/etc")


def test_a_corrupt_image_in_an_edit_pairs_folder_is_named(host, input_dir):
    folder = input_dir / "broken_sources"
    write_images(folder, 2)
    (folder / "01.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=r"image '.*broken_sources/01.png' cannot be read .*replace or remove it"):
        host.node("UniPic2EditPairs").make("make it snow\nadd a boat", folder="broken_sources")
