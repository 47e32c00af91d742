/** Recognises an image file's format from its first bytes, as qemu-img's probing does. */
import { UnsupportedError } from '../errors';

export type ImageFormat = 'qcow2' | 'raw';

/** Formats we recognise but do not serve, by their magic. */
const OTHER_FORMATS: Array<{ name: string; at: number; magic: Buffer }> = [
  { name: 'vmdk', at: 0, magic: Buffer.from('KDMV') },
  { name: 'vmdk (descriptor)', at: 0, magic: Buffer.from('# Disk DescriptorFile') },
  { name: 'vdi', at: 64, magic: Buffer.from([0x7f, 0x10, 0xda, 0xbe]) },
  { name: 'vhdx', at: 0, magic: Buffer.from('vhdxfile') },
  { name: 'vpc (vhd)', at: 0, magic: Buffer.from('conectix') },
  { name: 'qed', at: 0, magic: Buffer.from('QED\0') },
  { name: 'luks', at: 0, magic: Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]) },
];

/** Returns 'qcow2' for the qcow/qcow2 magic (the header decoder names the version), else 'raw'. */
export function probeFormat(head: Buffer, path: string): ImageFormat {
  if (head.length >= 4 && head.readUInt32BE(0) === 0x514649fb) return 'qcow2';
  for (const f of OTHER_FORMATS) {
    if (head.length >= f.at + f.magic.length && head.subarray(f.at, f.at + f.magic.length).equals(f.magic)) {
      throw new UnsupportedError(`${path}: ${f.name} images are not supported (convert it with qemu-img first)`);
    }
  }
  return 'raw';
}

export function parseFormat(name: string, where: string): ImageFormat {
  if (name === 'qcow2' || name === 'raw') return name;
  throw new UnsupportedError(`${where}: format "${name}" is not supported (qcow2 or raw)`);
}
