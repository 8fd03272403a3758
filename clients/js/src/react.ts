/**
 * React hooks for pgcast: `useConnectionStatus` for a Live / Connecting badge, `useChannel` to
 * hold a channel for a component's lifetime, `useTableChanges` to react to row changes. The
 * channel resumes by itself across reconnects, so a component never misses a change.
 */
import { useEffect, useRef, useState } from 'react';
import type { Change, ChangeFilter, Channel, ChannelOptions, PgcastClient, Status } from './index.js';

/** The client's connection status, re-rendering on every change. */
export function useConnectionStatus(client: PgcastClient): Status {
  const [status, setStatus] = useState<Status>(client.status);
  useEffect(() => {
    setStatus(client.status);
    return client.onStatus(setStatus);
  }, [client]);
  return status;
}

/**
 * Subscribes to channel `name` while the component is mounted. `setup` registers listeners
 * (`onChange`, `onBroadcast`, ...) before the join; the channel is left on unmount.
 */
export function useChannel(
  client: PgcastClient,
  name: string,
  setup: (channel: Channel) => void,
  options: ChannelOptions = {},
): { channel: Channel | null; error: Error | null } {
  const [channel, setChannel] = useState<Channel | null>(null);
  const [error, setError] = useState<Error | null>(null);
  const setupRef = useRef(setup);
  setupRef.current = setup;
  useEffect(() => {
    const ch = client.channel(name, options);
    setupRef.current(ch);
    setChannel(ch);
    ch.subscribe().catch(setError);
    return () => {
      void ch.unsubscribe();
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [client, name, options.private, options.presenceKey, options.broadcastSelf]);
  return { channel, error };
}

/** Calls `onChange` for every change of a table matching `filter`, for the latest callback. */
export function useTableChanges<Row = Record<string, unknown>>(
  client: PgcastClient,
  filter: ChangeFilter,
  onChange: (change: Change<Row>) => void,
  channelName = `table:${filter.schema ?? 'public'}:${filter.table}:${filter.event}:${filter.filter ?? ''}`,
): { error: Error | null } {
  const callback = useRef(onChange);
  callback.current = onChange;
  const { error } = useChannel(client, channelName, (channel) => {
    channel.onChange<Row>(filter, (change) => callback.current(change));
  });
  return { error };
}
