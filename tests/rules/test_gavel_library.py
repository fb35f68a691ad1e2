"""The public GAVEL library format read unchanged: gavel.yaml, categories.yaml, index.json, provenance, tags,
namespaces and references, rulesets; unknown metadata keys kept and warned about in GAVEL files, errors in packs."""
import shutil
import textwrap
from pathlib import Path

import pytest
from helpers import paths

from gavel.errors import RuleError
from gavel.io.metadata import FileWarning
from gavel.rules import RuleErrors, collect_rules, lint, load_rules

LIBRARY = paths.FIXTURES / "gavel_library"
LIBRARY_CES = sorted(p.name for p in (LIBRARY / "ces").iterdir())


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def where(path: Path, needle: str) -> tuple[str, int, int]:
    """Path, line and column of the first occurrence of `needle` in the file: the reference for located messages."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return str(path), number, line.index(needle) + 1
    raise AssertionError(f"{needle!r} not in {path}")


def at(finding: RuleError | FileWarning) -> tuple[str | None, int | None, int | None]:
    return finding.location.path, finding.location.line, finding.location.column


def collect(*args, **kwargs) -> tuple[list, list[RuleError], list[FileWarning]]:
    warnings: list[FileWarning] = []
    rules, errors = collect_rules(*args, warnings=warnings, **kwargs)
    return rules, errors, warnings


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """A copy of the fixture library, to plant problems in."""
    return Path(shutil.copytree(LIBRARY, tmp_path / "lib"))


def test_every_documented_field_is_read_and_kept():
    rules, errors, warnings = collect(LIBRARY)
    assert errors == [] and warnings == []
    romance = {r.name: r for r in rules}["romance_baiting"]
    assert romance.public_id == "rule_5d1f3a0c9e2b47d8a6c4f0e1b2a39d7e" and romance.namespace == "gavel"
    assert romance.categories == ("Safety & Harm Prevention", "Tone & Style")
    assert romance.tags == ("scam.romance", "owasp.llm01")
    assert romance.provenance.published_at == "2026-06-11T09:59:26Z"
    assert romance.provenance.publisher.hf_handle == "GavelPublicData"
    assert romance.provenance.publisher.username == "GAVEL Research Team"
    # `gavel/x` and `gavel/ce/x` name CEs of the library's own namespace: the local names
    assert romance.groups == {"emotional_hook": ("emotionally_engaging",),
                              "solicited_action": ("payment_tools", "urgency"),
                              "rapport_tactic": ("role_playing", "impersonation")}
    assert set(romance.ce_names) <= set(LIBRARY_CES)
    assert lint(rules, ces=LIBRARY_CES) == []


def test_a_gavel_ruleset_with_every_documented_field():
    scams = LIBRARY / "rulesets" / "scams.yaml"
    assert [r.name for r in load_rules(scams)] == ["tax_scam", "payment_pressure", "romance_baiting"]


def test_unknown_keys_in_gavel_files_are_kept_and_warned_about(library):
    rule = library / "rules" / "tax_scam" / "rule.yaml"
    rule.write_text(rule.read_text().replace("provenance:\n", "license: MIT\nprovenance:\n  reviewed_by: alice\n"))
    ruleset = library / "rulesets" / "scams.yaml"
    ruleset.write_text(ruleset.read_text() + "homepage: https://example.org\n")
    manifest = library / "gavel.yaml"
    manifest.write_text(manifest.read_text() + "maintainers: [gavel]\n")
    categories = library / "categories.yaml"
    categories.write_text(categories.read_text() + "- name: Privacy\n  colour: blue\n")
    rules, errors, warnings = collect(library)
    assert errors == []
    assert len(rules) == 5  # nothing is lost: the rules load as before
    tax = {r.name: r for r in rules}["tax_scam"]
    assert tax.unknown_fields == {"license": "MIT", "provenance.reviewed_by": "alice"}
    assert tax.provenance.created_by == "gavel"
    found = {(at(w), w.message, w.hint) for w in warnings}
    assert found == {
        (where(manifest, "maintainers"), "unknown field 'maintainers' (kept, not read by gavel)", None),
        (where(categories, "colour"), "category 5: unknown field 'colour' (kept, not read by gavel)", None),
        (where(rule, "license"), "rule 'tax_scam': unknown field 'license' (kept, not read by gavel)", None),
        (where(rule, "reviewed_by"), "rule 'tax_scam': unknown field 'provenance.reviewed_by' (kept, not read by "
                                     "gavel)", "did you mean 'created_by'?"),
        (where(ruleset, "homepage"), "ruleset 'scams': unknown field 'homepage' (kept, not read by gavel)", None),
    }
    assert len(warnings) == 5  # a rule reached from three rulesets is read, and warned about, once
    assert str(warnings[0]).startswith(f"{manifest}:3:1: warning: unknown field 'maintainers'")


def test_gavel_packs_and_plain_rule_files_stay_strict(tmp_path):
    pack = write(tmp_path / "pack.yaml", """
        pack: mine
        license: MIT
        rules:
          - name: r
            condition: tax
            provenance: {created_by: me, reviewed_by: you}
        """)
    plain = write(tmp_path / "plain" / "r.yaml", "name: r2\ncondition: tax\nlicense: MIT\n")
    _, errors, warnings = collect([pack, plain])
    assert warnings == []
    assert {(at(e), e.message) for e in errors} == {
        (where(pack, "license"), "unknown field 'license'"),
        (where(pack, "reviewed_by"), "rule 'r': unknown field 'provenance.reviewed_by'"),
        (where(plain, "license"), "rule 'r2': unknown field 'license'"),
    }
    # a file declaring the format's schema_version is a GAVEL file, wherever it is
    versioned = write(tmp_path / "versioned" / "r.yaml", "name: r3\nschema_version: 1\ncondition: tax\nlicense: MIT\n")
    rules, errors, warnings = collect(versioned)
    assert errors == [] and rules[0].unknown_fields == {"license": "MIT"} and at(warnings[0])[1:] == (4, 1)


def test_a_misspelt_required_field_is_still_an_error(library):
    rule = library / "rules" / "tax_scam" / "rule.yaml"
    rule.write_text(rule.read_text().replace("condition:", "condtion:"))
    _, errors, warnings = collect(library)
    assert [e.message for e in errors] == ["rule 'tax_scam': missing required field 'condition'"]
    assert [(w.message.split(":")[1].strip(), w.hint) for w in warnings] == [
        ("unknown field 'condtion' (kept, not read by gavel)", "did you mean 'condition'?")]


def test_categories_come_from_categories_yaml(library):
    rule = library / "rules" / "tax_scam" / "rule.yaml"
    rule.write_text(rule.read_text().replace("categories: [Security & Defense]", "categories: [Security & Defence]"))
    ruleset = library / "rulesets" / "scams.yaml"
    ruleset.write_text(ruleset.read_text().replace("- Fraud\n", "- Frauds\n"))
    _, errors, _ = collect(library)
    assert {(at(e), e.message, e.hint) for e in errors} == {
        (where(rule, "Security & Defence"), "rule 'tax_scam': category 'Security & Defence' is not in "
                                            f"{library / 'categories.yaml'}", "did you mean 'Security & Defense'?"),
        (where(ruleset, "Frauds"), f"ruleset 'scams': category 'Frauds' is not in {library / 'categories.yaml'}",
         "did you mean 'Fraud'?"),
    }
    (library / "categories.yaml").unlink()  # without the file, any category is accepted
    assert collect(library)[1] == []


def test_names_and_tags_follow_the_format(library):
    rule = library / "rules" / "tax_scam" / "rule.yaml"
    rule.write_text(rule.read_text().replace("name: tax_scam", "name: tax_scams") + "tags: [Scam.Tax, scam.tax]\n")
    ruleset = library / "rulesets" / "scams.yaml"
    ruleset.write_text(ruleset.read_text().replace("name: scams", "name: scam"))
    _, errors, _ = collect([library / "rules" / "tax_scam", library / "rulesets" / "scams.yaml"])
    found = {(at(e), e.message) for e in errors}
    assert (where(rule, "tax_scams"), "rule 'tax_scams': name 'tax_scams' differs from its path's 'tax_scam'") in found
    assert (where(rule, "Scam.Tax"), "rule 'tax_scams': tag 'Scam.Tax' is not lowercase dotted words") in found
    assert (where(ruleset, "scam"), "ruleset 'scam': name 'scam' differs from its path's 'scams'") in found


def test_references_to_other_namespaces_are_missing_dependencies(library, tmp_path):
    rule = library / "rules" / "romance_baiting" / "rule.yaml"
    rule.write_text(rule.read_text().replace("urgency]", "acme/ce/urgency]"))
    ruleset = library / "rulesets" / "scams.yaml"
    ruleset.write_text(ruleset.read_text().replace("- tax_scam\n", "- acme/tax_scam\n"))
    rules, errors, _ = collect(library)
    assert {(at(e), e.message) for e in errors} == {
        (where(rule, "acme/ce/urgency"), "rule 'romance_baiting': missing dependency: ce 'urgency' of namespace "
                                         "'acme', which is not loaded"),
        (where(ruleset, "acme/tax_scam"), "ruleset 'scams': missing dependency: rule 'tax_scam' of namespace 'acme', "
                                         "which is not loaded"),
    }
    assert all(e.hint == "load the library whose gavel.yaml says `namespace: acme` together with this one"
               for e in errors)
    # loaded together with the acme library, both resolve
    acme = tmp_path / "acme"
    write(acme / "gavel.yaml", "schema_version: 1\nnamespace: acme\n")
    write(acme / "rules" / "acme_tax" / "rule.yaml", "name: acme_tax\ncondition: tax\n")
    ruleset.write_text(ruleset.read_text().replace("- acme/tax_scam\n", "- acme/acme_tax\n"))
    rules, errors, _ = collect([library, acme])
    assert errors == []
    romance = {r.name: r for r in rules}["romance_baiting"]
    assert romance.groups["solicited_action"] == ("payment_tools", "urgency")
    assert [r.name for r in load_rules([acme, ruleset])] == ["acme_tax", "payment_pressure", "romance_baiting"]


def test_bad_references_are_located(library):
    rule = library / "rules" / "romance_baiting" / "rule.yaml"
    rule.write_text(rule.read_text().replace("gavel/ce/payment_tools", "gavel/rule/payment_pressure")
                    .replace("gavel/impersonation", "gavel/x/y/z"))
    _, errors, _ = collect(rule)
    assert {(at(e), e.message) for e in errors} == {
        (where(rule, "gavel/rule/payment_pressure"), "rule 'romance_baiting': 'gavel/rule/payment_pressure' names "
                                                     "a rule, but this field lists ces"),
        (where(rule, "gavel/x/y/z"), "rule 'romance_baiting': 'gavel/x/y/z' is not a ce name, `namespace/name` or "
                                     "`namespace/ce/name`"),
    }


def test_a_file_namespace_overrides_the_library(library):
    rule = library / "rules" / "romance_baiting" / "rule.yaml"
    rule.write_text(rule.read_text().replace("namespace: gavel", "namespace: partner"))
    rules, errors, _ = collect(library)
    # `gavel/...` is now another namespace, present because the library (namespace gavel) is loaded
    assert errors == [] and {r.name: r for r in rules}["romance_baiting"].resolved_namespace == "partner"
    _, errors, _ = collect(rule)  # alone, gavel is the library's namespace: still present
    assert errors == []
    shutil.copy(rule, library.parent / "rule.yaml")
    _, errors, _ = collect(library.parent / "rule.yaml")  # outside the library, nothing is namespace gavel
    assert {e.message.split(": ", 1)[1] for e in errors} == {
        f"missing dependency: ce '{ce}' of namespace 'gavel', which is not loaded"
        for ce in ("emotionally_engaging", "payment_tools", "impersonation")}


def test_provenance_is_validated_in_gavel_files(library):
    rule = library / "rules" / "tax_scam" / "rule.yaml"
    text = rule.read_text()
    rule.write_text(text.replace("published_at: '2026-05-07T09:28:15Z'", "published_at: 2026-05-07T09:28:15Z"))
    assert load_rules(rule)[0].provenance.published_at == "2026-05-07T09:28:15Z"  # unquoted: the same text
    rule.write_text(text.replace("'2026-05-07T09:28:15Z'", "last tuesday"))
    with pytest.raises(RuleErrors) as info:
        load_rules(rule)
    (error,) = info.value.errors
    assert at(error) == where(rule, "last tuesday")
    assert error.message == ("rule 'tax_scam': provenance.published_at: 'last tuesday' is not an ISO-8601 date and "
                             "time, like '2026-06-11T09:59:26Z'")


def test_library_files_that_are_not_rules_are_checked(library):
    (library / "gavel.yaml").write_text("schema_version: 2\nnamespace: gavel\n")
    (library / "categories.yaml").write_text("Fraud: scams\n")
    (library / "index.json").write_text("{not json")  # generated: never read
    _, errors, _ = collect(library)
    assert [(Path(e.location.path).name, e.location.line) for e in errors] == [("gavel.yaml", 1),
                                                                            ("categories.yaml", 1)]
    assert "schema_version: Input should be 1" in errors[0].message
    assert "categories.yaml must be a list" in errors[1].message
