/** A one-line progress indicator on a terminal, in qemu-img -p's style: "    (42.00/100%)". */
export class Progress {
  private last = -1;
  private shown = false;

  constructor(private readonly out: NodeJS.WriteStream) {}

  /** fraction in 0..1; redraws only when the shown value changes. */
  update(fraction: number): void {
    const pct = Math.floor(Math.min(1, Math.max(0, fraction)) * 10000) / 100;
    if (pct === this.last) return;
    this.last = pct;
    this.shown = true;
    this.out.write(`\r    (${pct.toFixed(2)}/100%)`);
  }

  /** Removes the line so that other output can be printed. */
  clear(): void {
    if (!this.shown) return;
    this.out.write('\r\x1b[K');
    this.shown = false;
    this.last = -1;
  }

  done(): void {
    if (this.last >= 0) this.update(1);
    if (this.shown) this.out.write('\n');
    this.shown = false;
  }
}
