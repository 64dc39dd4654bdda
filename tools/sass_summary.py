"""Per-kernel summary of a `cuobjdump -sass` listing: highest register, local-memory traffic, matrix instructions.

    cuobjdump -sass scaled_rope/_C*.so > sass.txt && python tools/sass_summary.py sass.txt [name-substring]

Answers the questions METHOD.md puts to the disassembly without reading it: did an array go to local memory
(LDL/STL), are the wgmma (HGMMA) instructions there, how many CTA and named barriers, register budget changes.
"""
import re
import sys


def main():
    text = open(sys.argv[1]).read()
    wanted = sys.argv[2] if len(sys.argv) > 2 else "flash_fwd"
    for body in re.split(r"\n\s+Function : ", text)[1:]:
        name = body.split("\n", 1)[0].strip()
        if wanted not in name:
            continue
        registers = [int(r) for r in re.findall(r"\bR(\d+)\b", body)]
        counts = {op: len(re.findall(rf"\b{op}\b", body)) for op in
                  ("LDL", "STL", "HGMMA", "BAR", "SYNCS", "USETMAXREG", "UTMALDG", "LDGSTS", "MUFU")}
        total = len(re.findall(r"/\*[0-9a-f]{4}\*/", body))
        print(f"{name[:110]}\n  instructions {total}, highest register R{max(registers, default=0)}, "
              + ", ".join(f"{op} {n}" for op, n in counts.items()))


if __name__ == "__main__":
    main()
