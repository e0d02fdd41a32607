"""The plain-text tables and summaries of inspect, ls and gc: the same words as their JSON
reports, whole when piped (fcsnap.render)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fcsnap.api import Inspection


def _build_cell(build_id: str) -> str:
    """A build id as tables show it: short, as git and docker do (--json keeps it whole; a
    prefix of 4 or more digits names the build). Zero mappings carry the nil build id in the
    header (and in --json); tables say so."""
    from fcsnap.header import NIL
    from fcsnap.store.format.prefixes import short_id

    return "(zeros)" if build_id == str(NIL) else short_id(build_id)


def _pinned_text(report: dict[str, Any]) -> str:
    """inspect's `pinned` row: what the check of the pins found, never a bare yes."""
    if not report["pinned"]:
        return "no (unpinned: ancestors trusted by id)"
    errors = report["pin_errors"]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"FAILED: {errors[0]}{more}"
    return "yes (every build read matches its pin)"


def _render_builds_section(section: dict, lookups: list[dict] | None) -> list[str]:
    """E2B's V4/V5 builds section: the flags, per build its size, checksum and frame table,
    the frames themselves (with --mappings), and the frame each lookup falls in."""
    from fcsnap.render import table
    from fcsnap.units import format_bytes

    title = f"E2B builds section (flags {section['flags']:#04x})" + (
        " (incomplete, pending upload: a peer's header, the build's data not yet stored)"
        if section["incomplete_pending_upload"] else "")
    rows = [
        (b["build_id"], format_bytes(b["file_size"]), b["sha256"] or "unknown (zeros)",
         b["compression"], str(b["frames"]), format_bytes(b["frames_uncompressed_bytes"]),
         format_bytes(b["frames_compressed_bytes"]))
        for b in section["builds"]
    ]
    columns = ("build", "file size", "sha256", "compression", "frames", "uncompressed",
               "compressed")
    parts = [table(columns, rows, title=title,
                   left=("build", "sha256"))]
    frame_rows = [
        (b["build_id"], str(i), f"{f['uncompressed_offset']:#x}", f"{f['uncompressed_length']:#x}",
         f"{f['compressed_offset']:#x}", f"{f['compressed_length']:#x}")
        for b in section["builds"] for i, f in enumerate(b.get("frame_table", ()))
    ]
    if frame_rows:
        columns = ("build", "frame", "uncompressed offset", "length", "compressed offset",
                   "length")
        parts.append(table(columns, frame_rows, title="Frames", left=("build",)))
    if lookups:
        rows = [
            (f"{r['offset']:#x}", _build_cell(r["build_id"]),
             *((f"{f['uncompressed_offset']:#x}", f"{f['uncompressed_length']:#x}",
                f"{f['compressed_offset']:#x}", f"{f['compressed_length']:#x}")
               if (f := r["frame"]) else ("-", "-", "-", "-")))
            for r in lookups
        ]
        columns = ("offset", "build", "frame uncompressed offset", "length",
                   "compressed offset", "length")
        parts.append(table(columns, rows, title="Frames holding the looked-up offsets",
                           left=("build",)))
    return parts


def render_inspect(inspection: Inspection) -> str:
    """The plain-text tables of `inspect`: the header, the builds it reads (and its zeros),
    then the mappings and lookups asked for. The same words as the JSON report."""
    from fcsnap.render import table
    from fcsnap.units import format_block_size, format_bytes

    report = inspection.report
    meta = report["metadata"]
    if meta["generation"] == 0:
        parent = "none (generation 0)"
    else:
        parent = meta["parent_build_id"] or "unknown (no build.json beside the header)"
    header = table((), [
        ("build_id", meta["build_id"]),
        ("generation", str(meta["generation"])),
        ("parent_build_id", parent),
        ("base_build_id", f"{meta['base_build_id']} (generation 0 of this lineage)"),
        ("version", str(meta["version"])),
        ("block_size", format_block_size(meta["block_size"])),
        ("size", f"{format_bytes(meta['size'])} ({meta['size']} bytes)"),
        ("mappings", str(report["mapping_count"])),
        *([("pinned", _pinned_text(report))] if "pinned" in report else []),
    ], title=f"Header {inspection.path}")
    rows = [
        (_build_cell(row["build_id"]), "?" if row["generation"] is None else str(row["generation"]),
         str(row["mappings"]), str(row["blocks"]), format_bytes(row["bytes"]),
         f"{row['share']:.1%}")
        for row in report["builds"]
    ]
    zero = report["zero"]
    rows.append((
        "(zeros)", "", str(zero["mappings"]), str(zero["bytes"] // meta["block_size"]),
        format_bytes(zero["bytes"]), f"{zero['share']:.1%}",
    ))
    columns = ("build", "generation", "mappings", "blocks", "bytes", "share")
    parts = [header, table(columns, rows, title="Builds read by this generation", left=("build",))]
    if "e2b" in report:
        parts += _render_builds_section(report["e2b"], report.get("lookups"))
    if "mappings" in report:
        columns = ("offset", "length", "build", "build_storage_offset")
        parts.append(table(columns, (
            (f"{m['offset']:#x}", f"{m['length']:#x}", _build_cell(m["build_id"]),
             f"{m['build_storage_offset']:#x}")
            for m in report["mappings"]
        ), title="Mappings", left=("build",)))
    if "lookups" in report:
        columns = ("offset", "build", "build_storage_offset", "remaining_length")
        parts.append(table(columns, (
            (f"{r['offset']:#x}", _build_cell(r["build_id"]), f"{r['build_storage_offset']:#x}",
             f"{r['remaining_length']:#x}")
            for r in report["lookups"]
        ), title="Lookups", left=("build",)))
    return "\n\n".join(parts)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _generation(value: int | None) -> str:
    return "?" if value is None else str(value)


def render_names(rows: list[dict[str, Any]]) -> str:
    from fcsnap.render import table
    from fcsnap.units import format_bytes

    columns = ("name", "head", "gen", "created", "memory", "lineage", "shared", "head reads")
    text = table(columns, [(
        r["name"], _build_cell(r["head"]) if r["head"] else "?", _generation(r["generation"]),
        r["created_at"] or "?",
        "?" if r["memory_bytes"] is None else format_bytes(r["memory_bytes"]),
        format_bytes(r["lineage_bytes"]), format_bytes(r["shared_bytes"]),
        _fraction(r["live_fraction"]),
    ) for r in rows], title="Names", left=("name", "head", "created"))
    errors = [f"{r['name']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join([text, *errors])


def _readers(row: dict[str, Any]) -> str:
    """`ls --builds`' read-by column: the names whose heads read the build, and those whose
    head it is without reading it (it stores nothing they read); `unreferenced` as the JSON
    and the summary count it."""
    heads = [f"{name} (head)" for name in row["head_of"] if name not in row["read_by"]]
    return ", ".join([*row["read_by"], *heads]) or ("unreferenced" if row["unreferenced"] else "-")


def render_builds(rows: list[dict[str, Any]]) -> str:
    from fcsnap.render import table
    from fcsnap.units import format_bytes

    columns = ("build", "gen", "parent", "on disk", "live", "read by")
    text = table(columns, [(
        _build_cell(r["build_id"]), _generation(r["generation"]),
        _build_cell(r["parent"]) if r["parent"] else "-",
        format_bytes(r["disk_bytes"]), _fraction(r["live_fraction"]), _readers(r),
    ) for r in rows], title="Builds", left=("build", "parent", "read by"))
    errors = [f"{r['build_id']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join([text, *errors])


def render_summary(s: dict[str, Any]) -> str:
    from fcsnap.units import format_bytes, plural

    amp = "-" if s["amplification"] is None else f"{s['amplification']:.2f}x"
    return (
        f"{plural(s['names'], 'name')}, {plural(s['builds'], 'build')} "
        f"({s['unreferenced_builds']} unreferenced): {format_bytes(s['disk_bytes'])} on disk, "
        f"heads read {format_bytes(s['live_bytes'])} (space amplification {amp})"
    )


def render_lineage(report: dict[str, Any]) -> str:
    from fcsnap.render import table
    from fcsnap.units import format_bytes

    def reads(r: dict[str, Any]) -> str:
        if "pin_error" in r:
            return "FAILS ITS PIN"
        if "error" in r:
            return "DAMAGED"
        return f"{format_bytes(r['head_reads_bytes'])} ({_fraction(r['head_reads_fraction'])})"

    rows = [
        ("?", _build_cell(r["build_id"]), "missing", "", "") if r["missing"] else (
            _generation(r["generation"]), _build_cell(r["build_id"]), r["created_at"] or "?",
            format_bytes(r["disk_bytes"]), reads(r),
        )
        for r in report["generations"]
    ]
    text = table(("gen", "build", "created", "on disk", "head reads"), rows,
                 title=f"{report['name']}: lineage of {report['head']}",
                 left=("build", "created"))
    pinned = {
        True: "pins: every build the head reads matches its pin",
        False: "pins: none (unpinned: ancestors trusted by id)",
        None: "pins: not checked (the head's build.json cannot be read)",
    }[report["pinned"]]
    errors = [f"{r['build_id']}: {r['error']}" for r in report["generations"] if "error" in r]
    if report["pin_errors"]:
        pinned = "pins: FAILED"
    return "\n".join([text, pinned, *report["pin_errors"], *errors])


def render_gc(report: dict[str, Any]) -> str:
    from fcsnap.units import format_bytes, plural

    dry = report["dry_run"]
    lines = []
    for row in report["repacked"]:
        if "skipped" in row:
            lines.append(f"not repacked {row['name']}: {row['skipped']}")
            continue
        target = "" if dry else (
            f" as {row['new_head']} ({format_bytes(row['new_head_disk_bytes'])})"
        )
        lines.append(
            f"{'would repack' if dry else 'repacked'} {row['name']} (its head read "
            f"{row['live_fraction']:.1%} of its lineage){target}"
        )
    deleted = report["would_delete" if dry else "deleted"]
    for row in deleted:
        lines.append(
            f"{'would delete' if dry else 'deleted'} build {row['build_id']} "
            f"({format_bytes(row['disk_bytes'])})"
        )
    for row in report["kept"]:
        lines.append(f"kept unreferenced build {row['build_id']}: {row['reason']}")
    for name in report["leftovers"]:
        lines.append(f"{'would remove' if dry else 'removed'} leftover {name}")
    for lease in report.get("stale_leases", ()):
        lines.append(
            f"ignored stale lease {lease['lease']} ({lease['holder']}, not refreshed for "
            f"{lease['age_s']:g}s, expires after {lease['expires_after_s']:g}s)"
            f"{'' if dry else '; removed'}"
        )
    freed = report["bytes_to_free" if dry else "bytes_freed"]
    after = report["after"]
    amp = "-" if after["amplification"] is None else f"{after['amplification']:.2f}x"
    written = sum(r.get("new_head_disk_bytes", 0) for r in report["repacked"])
    repack = f", repacks wrote {format_bytes(written)}" if written else ""
    lines.append(
        f"{'would free' if dry else 'freed'} {format_bytes(freed)} in "
        f"{plural(len(deleted), 'build')}{repack}; {format_bytes(after['disk_bytes'])} on disk "
        f"(space amplification {amp})"
    )
    return "\n".join(lines)
