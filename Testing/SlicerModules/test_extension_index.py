"""What the Slicer ExtensionsIndex checks before it lists the extension, checked offline.

The checks mirror Slicer/ExtensionsIndex ``scripts/check_description_files.py`` (read at its
2026-11 main branch): the catalog JSON validates against the schema its ``$schema`` names; the
category is one the index accepts; the CMake ``project()`` name equals the JSON file's name, which
does not start with "Slicer" while the repository name does; the icon and screenshot URLs are
downloadable images (here: they point into this repository at files that exist and are PNGs);
a LICENSE file exists; the repository stays under 100 MB.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
MODULES = ("ContrastAmplifier", "ContrastAmplifierTraining", "LesionReader")
#: Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json at 583e9b37d5 (kept as test data).
SCHEMA = DATA / "slicer-extension-catalog-entry-schema-v1.0.1.json"
#: The categories of ExtensionsIndex's ACCEPTED_EXTENSION_CATEGORIES that could describe this extension.
ACCEPTED_CATEGORIES_NEAR_US = {"Image Synthesis", "Neuroimaging", "Quantification", "Filtering", "Analysis"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cmake() -> str:
    return (REPO / "CMakeLists.txt").read_text(encoding="utf-8")


def _cmake_value(name: str) -> str:
    match = re.search(rf'set\(\s*{name}\s+"([^"]*)"\s*\)', _cmake())
    assert match, f"top-level CMakeLists.txt lacks set({name} \"...\")"
    return match.group(1)


def _catalog() -> dict:
    return json.loads((REPO / "Resources" / "ContrastAmplifier.json").read_text(encoding="utf-8"))


def test_catalog_json_validates_against_slicers_schema():
    data = _catalog()
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert data["$schema"].rstrip("#") == schema["$id"].rstrip("#")
    jsonschema.validate(data, schema)


def test_one_category_everywhere_and_accepted_by_the_index():
    category = _cmake_value("EXTENSION_CATEGORY")
    assert category in ACCEPTED_CATEGORIES_NEAR_US
    assert _catalog()["category"] == category
    for module in MODULES:
        tree = ast.parse((REPO / module / f"{module}.py").read_text(encoding="utf-8"))
        found = [ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Attribute) and t.attr == "categories" for t in node.targets)]
        assert found == [[category]], f"{module}.py: parent.categories {found} (the extension's category is {category!r})"


def test_names_follow_the_index_rules():
    project = re.search(r"project\(\s*([^\s)]+)", _cmake()).group(1)
    assert project == "ContrastAmplifier" and (REPO / "Resources" / f"{project}.json").is_file()
    assert not project.lower().startswith("slicer")
    repository = _catalog()["scm_url"].rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    assert repository.startswith("Slicer")
    assert (REPO / "LICENSE").is_file()


def test_description_is_one_or_two_sentences_and_says_not_for_clinical_use():
    description = _cmake_value("EXTENSION_DESCRIPTION")
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", description.strip()) if s]
    assert 1 <= len(sentences) <= 2, sentences
    assert "not for clinical use" in description


@pytest.mark.parametrize("variable", ["EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"])
def test_image_urls_point_at_committed_pngs(variable):
    owner_repo = re.search(r"github\.com/([^/]+/[^/.]+)", _catalog()["scm_url"]).group(1)
    urls = _cmake_value(variable).split()
    assert urls
    for url in urls:
        prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
        assert url.startswith(prefix), f"{url} is not a raw file of {owner_repo}"
        path = REPO / url[len(prefix):]
        assert path.is_file(), f"{variable}: {url} names {path.relative_to(REPO)}, which does not exist"
        head = path.read_bytes()[:8]
        assert head == PNG_MAGIC and path.stat().st_size < 2_000_000, f"{path.name} is not a PNG under 2 MB"
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=REPO, capture_output=True)
        assert tracked.returncode == 0 or not (REPO / ".git").exists(), f"{path} is not committed"


def test_repository_stays_under_the_index_size_limit():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    total = sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())
    assert total < 100 * 2**20, f"tracked files take {total / 2**20:.1f} MB; the ExtensionsIndex limit is 100 MB"
