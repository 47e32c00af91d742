/**
 * JSON printed the way qemu-img prints it (4-space indent, empty containers opened and closed on
 * separate lines), so that scripts and diffs written against qemu-img see the same text.
 * Keys keep insertion order; undefined values are left out.
 */
export type JsonValue = string | number | boolean | null | undefined | JsonValue[] | { [key: string]: JsonValue };

function str(s: string): string {
  // JSON.stringify escapes what JSON needs; QEMU additionally escapes non-ASCII as \uXXXX.
  return JSON.stringify(s).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

function render(v: JsonValue, level: number): string {
  const pad = '    '.repeat(level);
  const inner = '    '.repeat(level + 1);
  if (Array.isArray(v)) {
    const items = v.filter((x) => x !== undefined).map((x) => inner + render(x, level + 1));
    return items.length ? `[\n${items.join(',\n')}\n${pad}]` : `[\n${pad}]`;
  }
  if (v !== null && typeof v === 'object') {
    const items = Object.entries(v)
      .filter(([, x]) => x !== undefined)
      .map(([k, x]) => `${inner}${str(k)}: ${render(x, level + 1)}`);
    return items.length ? `{\n${items.join(',\n')}\n${pad}}` : `{\n${pad}}`;
  }
  if (typeof v === 'string') return str(v);
  return JSON.stringify(v ?? null);
}

/** The document, with a final newline. */
export function qemuJson(v: JsonValue): string {
  return render(v, 0) + '\n';
}
