/** Every verb's name, in help order (main.ts maps each to the module that registers it). */
export const COMMANDS = ['mount', 'umount', 'info', 'map', 'check', 'snapshot', 'install-helper', 'create', 'convert', 'resize', 'commit'] as const;

export type Verb = (typeof COMMANDS)[number];
