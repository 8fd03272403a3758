/**
 * pgcast client for browsers and Node: connect with a token (and a callback to refresh it),
 * reconnect with exponential backoff and jitter, resume every channel from its last position so
 * nothing is missed or doubled across drops, and report the connection status for a Live badge.
 *
 * It speaks pgcast's Supabase Realtime protocol (Phoenix channels, serializer 1.0.0) and reads
 * pgcast's additions: `data.pgcast.{position, epoch}` on changes, `meta.{seq, epoch}` on
 * broadcasts, and `system` messages with `extension: "pgcast"` (`resync_required`).
 */

export type Status = 'live' | 'connecting' | 'offline';

export interface ClientOptions {
  /** A fixed token (JWT). */
  token?: string;
  /**
   * Called before every (re)connect and before the token expires (30 s before its `exp`, or
   * half-way for a token shorter than a minute; at least 1 s apart); returns a fresh token.
   */
  getToken?: () => string | Promise<string>;
  /** WebSocket implementation; defaults to the global one (browsers, Node 22+). */
  transport?: WebSocketLike;
  /** First reconnect delay in ms (default 1000); doubles up to `maxDelayMs` (default 30000). */
  initialDelayMs?: number;
  maxDelayMs?: number;
  /**
   * Failed reconnects (after the first connect) before giving up: status `offline`, `onGiveUp`
   * listeners called, pending `subscribe()`s rejected, until `connect()` again (default: never).
   */
  maxAttempts?: number;
  heartbeatMs?: number;
}

/** The subset of the WebSocket API the client uses. */
export type WebSocketLike = new (url: string) => {
  readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onclose: ((ev: unknown) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
};

export interface ChangeFilter {
  /** `*` is INSERT, UPDATE and DELETE; truncations come only to a `TRUNCATE` binding. */
  event: 'INSERT' | 'UPDATE' | 'DELETE' | '*' | 'TRUNCATE';
  schema?: string;
  table: string;
  filter?: string;
}

/** One row change as pgcast sends it. */
export interface Change<Row = Record<string, unknown>> {
  schema: string;
  table: string;
  type: 'INSERT' | 'UPDATE' | 'DELETE' | 'TRUNCATE';
  commit_timestamp: string;
  record?: Row;
  old_record?: Partial<Row>;
  columns: { name: string; type: string }[];
  /** Set when an UPDATE moved the row out of what this user may see. */
  left_view?: boolean;
  changed_columns?: string[];
  pgcast: { position: string; epoch: string };
}

export interface ResyncNotice {
  scope: 'postgres_changes' | 'broadcast';
  message: string;
}

type Listener<T> = (value: T) => void;

interface Push {
  resolve: (response: unknown) => void;
  reject: (error: Error) => void;
}

/** How long a push waits for its reply. */
const PUSH_TIMEOUT_MS = 10_000;

const OPEN = 1;

export class PgcastClient {
  private readonly url: string;
  private readonly opts: Required<Pick<ClientOptions, 'initialDelayMs' | 'maxDelayMs' | 'maxAttempts' | 'heartbeatMs'>> &
    ClientOptions;
  private socket: InstanceType<WebSocketLike> | null = null;
  private ref = 0;
  private pending = new Map<string, Push>();
  private channels = new Map<string, Channel>();
  private statusListeners = new Set<Listener<Status>>();
  private giveUpListeners = new Set<Listener<number>>();
  private currentStatus: Status = 'offline';
  private attempts = 0;
  private stopped = true;
  /** Bumped by every `open()` and `disconnect()`: an `open()` that awaited a token checks it is still current. */
  private generation = 0;
  private heartbeat: ReturnType<typeof setInterval> | null = null;
  private retry: ReturnType<typeof setTimeout> | null = null;
  private refresh: ReturnType<typeof setTimeout> | null = null;
  token: string | undefined;

  /** `url` is the server's base, e.g. `ws://localhost:4000` or `wss://rt.example.com`. */
  constructor(url: string, options: ClientOptions = {}) {
    this.url = url.replace(/\/$/, '').replace(/\/realtime\/v1(\/websocket)?$/, '');
    this.opts = { initialDelayMs: 1000, maxDelayMs: 30000, maxAttempts: Infinity, heartbeatMs: 25000, ...options };
    this.token = options.token;
  }

  get status(): Status {
    return this.currentStatus;
  }

  /** Calls `listener` on every status change; returns a function that stops it. */
  onStatus(listener: Listener<Status>): () => void {
    this.statusListeners.add(listener);
    return () => this.statusListeners.delete(listener);
  }

  /**
   * Calls `listener` with the number of attempts when the client stops reconnecting after
   * `maxAttempts`; returns a function that stops it. Status is `offline` by then.
   */
  onGiveUp(listener: Listener<number>): () => void {
    this.giveUpListeners.add(listener);
    return () => this.giveUpListeners.delete(listener);
  }

  /** Connects, with `maxAttempts` fresh reconnects; does nothing while connected or reconnecting. */
  connect(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.attempts = 0;
    void this.open();
  }

  /** Closes for good (until `connect()` again); status becomes `offline`. */
  disconnect(): void {
    this.stopped = true;
    this.generation += 1;
    this.clearTimers();
    this.socket?.close(1000, 'client disconnect');
    this.socket = null;
    this.setStatus('offline');
  }

  channel(name: string, options: ChannelOptions = {}): Channel {
    const topic = `realtime:${name}`;
    let channel = this.channels.get(topic);
    if (!channel) {
      channel = new Channel(this, topic, options);
      this.channels.set(topic, channel);
    }
    return channel;
  }

  /** @internal */
  removeChannel(topic: string): void {
    this.channels.delete(topic);
  }

  private setStatus(status: Status): void {
    if (status === this.currentStatus) return;
    this.currentStatus = status;
    for (const listener of this.statusListeners) listener(status);
  }

  private clearTimers(): void {
    if (this.heartbeat) clearInterval(this.heartbeat);
    if (this.retry) clearTimeout(this.retry);
    if (this.refresh) clearTimeout(this.refresh);
    this.heartbeat = this.retry = this.refresh = null;
  }

  private async open(): Promise<void> {
    const generation = ++this.generation;
    this.setStatus('connecting');
    if (this.opts.getToken) {
      let token: string;
      try {
        token = await this.opts.getToken();
      } catch {
        if (generation === this.generation) this.scheduleReconnect();
        return;
      }
      // disconnect() (and perhaps connect()) while the token was on its way: this open is over.
      if (generation !== this.generation) return;
      this.token = token;
    }
    const Transport: WebSocketLike | undefined =
      this.opts.transport ?? (globalThis as unknown as { WebSocket?: WebSocketLike }).WebSocket;
    if (!Transport) throw new Error('no WebSocket implementation: pass options.transport (e.g. the ws package)');
    const params = new URLSearchParams({ vsn: '1.0.0' });
    if (this.token) params.set('apikey', this.token);
    const socket = new Transport(`${this.url}/realtime/v1/websocket?${params}`);
    this.socket = socket;
    socket.onopen = () => {
      if (socket !== this.socket) return;
      this.attempts = 0;
      this.setStatus('live');
      this.heartbeat = setInterval(() => {
        this.push('phoenix', 'heartbeat', {}).catch(() => socket.close(4001, 'heartbeat timeout'));
      }, this.opts.heartbeatMs);
      this.scheduleTokenRefresh();
      for (const channel of this.channels.values()) channel.rejoin();
    };
    socket.onmessage = (event) => {
      if (typeof event.data !== 'string') return;
      this.handle(JSON.parse(event.data));
    };
    socket.onerror = () => {};
    socket.onclose = () => {
      if (socket !== this.socket) return;
      this.socket = null;
      this.clearTimers();
      for (const push of this.pending.values()) push.reject(new Error('connection closed'));
      this.pending.clear();
      for (const channel of this.channels.values()) channel.disconnected();
      if (this.stopped) {
        this.setStatus('offline');
      } else {
        this.scheduleReconnect();
      }
    };
  }

  private scheduleReconnect(): void {
    if (this.stopped) return;
    if (this.attempts >= this.opts.maxAttempts) {
      this.stopped = true;
      this.setStatus('offline');
      const attempts = this.attempts;
      for (const listener of this.giveUpListeners) listener(attempts);
      const error = new Error(`gave up after ${attempts} reconnect attempts`);
      for (const channel of this.channels.values()) channel.failJoin(error);
      return;
    }
    const base = Math.min(this.opts.maxDelayMs, this.opts.initialDelayMs * 2 ** this.attempts);
    const delay = base / 2 + Math.random() * (base / 2); // jitter: half to full delay
    this.attempts += 1;
    this.setStatus('connecting');
    this.retry = setTimeout(() => void this.open(), delay);
  }

  private scheduleTokenRefresh(): void {
    const getToken = this.opts.getToken;
    if (!getToken || !this.token) return;
    const exp = tokenExpiry(this.token);
    if (!exp) return;
    const socket = this.socket;
    this.refresh = setTimeout(async () => {
      let token: string | undefined;
      try {
        token = await getToken();
      } catch {
        /* retried at the next refresh or reconnect */
      }
      // Closed while the token was on its way: the reconnect asks for one and schedules refreshes.
      if (socket !== this.socket) return;
      if (token) {
        this.token = token;
        for (const channel of this.channels.values()) channel.sendToken(token);
      }
      this.scheduleTokenRefresh();
    }, refreshDelay(exp * 1000 - Date.now()));
  }

  /** @internal Sends a frame; resolves with the reply's response, rejects on an error reply. */
  push(topic: string, event: string, payload: unknown, joinRef?: string): Promise<unknown> {
    const socket = this.socket;
    if (!socket || socket.readyState !== OPEN) return Promise.reject(new Error('not connected'));
    const ref = String(++this.ref);
    socket.send(JSON.stringify({ topic, event, payload, ref, join_ref: joinRef ?? null }));
    return new Promise((resolve, reject) => {
      // Cleared on the reply, so no timer outlives its push (a Node process can exit at once).
      const timer = setTimeout(() => {
        if (this.pending.delete(ref)) reject(new Error(`${event} timed out`));
      }, PUSH_TIMEOUT_MS);
      this.pending.set(ref, {
        resolve: (response) => {
          clearTimeout(timer);
          resolve(response);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
    });
  }

  private handle(message: {
    topic: string;
    event: string;
    payload: any;
    ref: string | null;
    join_ref?: string | null;
  }): void {
    if (message.event === 'phx_reply' && message.ref) {
      const push = this.pending.get(message.ref);
      if (!push) return;
      this.pending.delete(message.ref);
      if (message.payload?.status === 'ok') push.resolve(message.payload.response);
      else push.reject(new Error(message.payload?.response?.reason ?? 'error'));
      return;
    }
    this.channels.get(message.topic)?.receive(message.event, message.payload, message.join_ref ?? null);
  }
}

export interface ChannelOptions {
  private?: boolean;
  /** Receive your own broadcasts. */
  broadcastSelf?: boolean;
  presenceKey?: string;
}

interface ChangeBinding {
  filter: ChangeFilter;
  callback: Listener<Change>;
  id?: number;
}

/** A channel that resumes by itself: after any reconnect it rejoins from its last position. */
export class Channel {
  private readonly client: PgcastClient;
  readonly topic: string;
  private readonly options: ChannelOptions;
  private changeBindings: ChangeBinding[] = [];
  private broadcastListeners = new Map<string, Set<Listener<unknown>>>();
  private presenceListeners = new Set<Listener<Record<string, unknown[]>>>();
  private resyncListeners = new Set<Listener<ResyncNotice>>();
  private closeListeners = new Set<Listener<string>>();
  /** The reason of the server's last `system` error on this channel, if any. */
  private closeReason: string | null = null;
  private presence: Record<string, any[]> = {};
  private tracked: Record<string, unknown> | null = null;
  private joinRef: string | undefined;
  private wanted = false;
  private joined = false;
  private joinWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  /** Last change received: where a rejoin resumes from. */
  position: { position: string; epoch: string } | null = null;
  /** Last broadcast received. */
  broadcastPosition: { seq: number; epoch: string } | null = null;

  /** @internal */
  constructor(client: PgcastClient, topic: string, options: ChannelOptions) {
    this.client = client;
    this.topic = topic;
    this.options = options;
  }

  onChange<Row = Record<string, unknown>>(filter: ChangeFilter, callback: Listener<Change<Row>>): this {
    this.changeBindings.push({ filter: { schema: 'public', ...filter }, callback: callback as Listener<Change> });
    return this;
  }

  onBroadcast(event: string, callback: Listener<unknown>): this {
    let set = this.broadcastListeners.get(event);
    if (!set) this.broadcastListeners.set(event, (set = new Set()));
    set.add(callback);
    return this;
  }

  /** Called with the whole presence state (key -> metas) on every change. */
  onPresence(callback: Listener<Record<string, unknown[]>>): this {
    this.presenceListeners.add(callback);
    return this;
  }

  /** Called when the server cannot replay what was missed: refetch, then carry on live. */
  onResync(callback: Listener<ResyncNotice>): this {
    this.resyncListeners.add(callback);
    return this;
  }

  /**
   * Called with the reason when the server closes the channel on its own (its token expired,
   * or the role may no longer read it). The channel then stays closed, also across reconnects,
   * until `subscribe()` is called again.
   */
  onClose(callback: Listener<string>): this {
    this.closeListeners.add(callback);
    return this;
  }

  /** Joins (connecting the client if needed); resolves once joined, rejects with the reason. */
  subscribe(): Promise<void> {
    this.wanted = true;
    const joined = new Promise<void>((resolve, reject) => this.joinWaiters.push({ resolve, reject }));
    if (this.client.status === 'offline') this.client.connect();
    else if (this.client.status === 'live') this.rejoin();
    return joined;
  }

  async unsubscribe(): Promise<void> {
    this.wanted = false;
    if (this.joined) await this.client.push(this.topic, 'phx_leave', {}, this.joinRef).catch(() => {});
    this.joined = false;
    this.client.removeChannel(this.topic);
  }

  /** Broadcasts to the channel; resolves when the server acknowledged it. */
  async send(event: string, payload: unknown): Promise<void> {
    await this.client.push(this.topic, 'broadcast', { type: 'broadcast', event, payload }, this.joinRef);
  }

  async track(meta: Record<string, unknown>): Promise<void> {
    this.tracked = meta;
    await this.client.push(this.topic, 'presence', { type: 'presence', event: 'track', payload: meta }, this.joinRef);
  }

  async untrack(): Promise<void> {
    this.tracked = null;
    await this.client.push(this.topic, 'presence', { type: 'presence', event: 'untrack' }, this.joinRef);
  }

  /** Whether the channel is joined right now (false while reconnecting). */
  get isJoined(): boolean {
    return this.joined;
  }

  presenceState(): Record<string, unknown[]> {
    return structuredClone(this.presence);
  }

  /** @internal */
  disconnected(): void {
    this.joined = false;
  }

  /** @internal The client gave up: `subscribe()`s still waiting reject; a later `connect()` rejoins. */
  failJoin(error: Error): void {
    for (const waiter of this.joinWaiters.splice(0)) waiter.reject(error);
  }

  /** @internal */
  sendToken(token: string): void {
    if (this.joined) void this.client.push(this.topic, 'access_token', { access_token: token }, this.joinRef).catch(() => {});
  }

  /** @internal Joins, or rejoins after a reconnect, resuming from the last positions. */
  rejoin(): void {
    if (!this.wanted) return;
    const config: Record<string, unknown> = {
      broadcast: { self: !!this.options.broadcastSelf, ack: true },
      presence: { key: this.options.presenceKey ?? '', enabled: this.presenceListeners.size > 0 },
      postgres_changes: this.changeBindings.map((b) => b.filter),
      private: !!this.options.private,
    };
    const resume: Record<string, unknown> = {};
    if (this.position) Object.assign(resume, this.position);
    if (this.broadcastPosition) resume.broadcast = this.broadcastPosition;
    if (Object.keys(resume).length) config.resume = resume;
    const payload: Record<string, unknown> = { config };
    if (this.client.token) payload.access_token = this.client.token;
    this.presence = {};
    const joinRef = String(Date.now()) + Math.random().toString(36).slice(2, 6);
    this.joinRef = joinRef;
    this.client
      .push(this.topic, 'phx_join', payload, joinRef)
      .then((response: any) => {
        const bound = (response?.postgres_changes ?? []) as { id: number }[];
        this.changeBindings.forEach((binding, i) => (binding.id = bound[i]?.id));
        this.joined = true;
        if (this.tracked) void this.track(this.tracked).catch(() => {});
        for (const waiter of this.joinWaiters.splice(0)) waiter.resolve();
      })
      .catch((error: Error) => {
        if (error.message === 'connection closed' || error.message === 'not connected') return; // retried on reconnect
        this.wanted = false;
        for (const waiter of this.joinWaiters.splice(0)) waiter.reject(error);
      });
  }

  /** @internal */
  receive(event: string, payload: any, joinRef: string | null = null): void {
    switch (event) {
      case 'postgres_changes': {
        const data = payload.data as Change;
        const ids: number[] = payload.ids ?? [];
        if (data.pgcast) this.position = { position: data.pgcast.position, epoch: data.pgcast.epoch };
        for (const binding of this.changeBindings) {
          if (binding.id === undefined || !ids.includes(binding.id)) continue;
          const wanted = binding.filter.event;
          if (wanted === '*' || wanted === data.type) binding.callback(data);
        }
        break;
      }
      case 'broadcast': {
        if (payload.meta?.seq !== undefined) this.broadcastPosition = { seq: payload.meta.seq, epoch: payload.meta.epoch };
        for (const listener of this.broadcastListeners.get(payload.event) ?? []) listener(payload.payload);
        break;
      }
      case 'presence_state':
        this.presence = {};
        this.applyPresence(payload, {});
        break;
      case 'presence_diff':
        this.applyPresence(payload.joins ?? {}, payload.leaves ?? {});
        break;
      case 'system':
        // Where a new subscription starts: resume from here even if nothing arrives before a drop.
        if (payload.extension === 'postgres_changes' && payload.pgcast && !this.position) {
          this.position = { position: payload.pgcast.position, epoch: payload.pgcast.epoch };
        }
        if (payload.extension === 'system' && payload.status === 'error') {
          this.closeReason = typeof payload.message === 'string' ? payload.message : null;
        }
        if (payload.extension === 'pgcast' && payload.status === 'resync_required') {
          const scope = payload.scope === 'broadcast' ? 'broadcast' : 'postgres_changes';
          // Start over from live: the old positions are of no use any more.
          if (scope === 'broadcast') this.broadcastPosition = null;
          else this.position = null;
          for (const listener of this.resyncListeners) listener({ scope, message: payload.message });
        }
        break;
      case 'phx_close': {
        // The close of an earlier join (say, the answer to an unsubscribe followed at once by a
        // new subscribe) must not close the current one.
        if (joinRef && joinRef !== this.joinRef) break;
        this.joined = false;
        const closedByServer = this.wanted;
        this.wanted = false;
        const reason = this.closeReason ?? 'closed by the server';
        this.closeReason = null;
        if (closedByServer) for (const listener of this.closeListeners) listener(reason);
        break;
      }
    }
  }

  private applyPresence(joins: Record<string, { metas: any[] }>, leaves: Record<string, { metas: any[] }>): void {
    for (const [key, { metas }] of Object.entries(leaves)) {
      const refs = new Set(metas.map((m) => m.phx_ref));
      this.presence[key] = (this.presence[key] ?? []).filter((m) => !refs.has(m.phx_ref));
      if (this.presence[key].length === 0) delete this.presence[key];
    }
    for (const [key, { metas }] of Object.entries(joins)) {
      this.presence[key] = [...(this.presence[key] ?? []), ...metas];
    }
    const state = this.presenceState();
    for (const listener of this.presenceListeners) listener(state);
  }
}

/**
 * When to refresh a token with `remainingMs` to live: 30 s before it expires, or half-way for a
 * token shorter than a minute (so a 20 s token is not asked for every second); at least 1 s, so
 * a `getToken` that keeps returning an expired token is not called in a loop.
 */
function refreshDelay(remainingMs: number): number {
  return Math.max(1000, remainingMs > 60_000 ? remainingMs - 30_000 : remainingMs / 2);
}

/** `exp` of a JWT (seconds), without verifying it. */
function tokenExpiry(token: string): number | null {
  try {
    const part = token.split('.')[1];
    const json = typeof atob === 'function' ? atob(part.replace(/-/g, '+').replace(/_/g, '/')) : '';
    return JSON.parse(json).exp ?? null;
  } catch {
    return null;
  }
}
