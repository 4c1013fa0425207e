// The page's copy of the scene: item uuid -> the item's whole data, as the server last sent it
// (or as our own drag left it). Every change names the uuids it touched so the drawing can
// redraw only those.

/** The type of an item as the server reports it (`_type` is what scene files carry). */
export function itemType(item) {
  return item.item_type ?? item._type ?? 'component';
}

export class Scene extends EventTarget {
  constructor() {
    super();
    /** @type {Map<string, object>} */
    this.items = new Map();
    this.version = null;
  }

  changed(uuids, whole = false) {
    this.dispatchEvent(new CustomEvent('change', { detail: { uuids, whole } }));
  }

  /** A `sync:full_state`: the scene is exactly these items now. */
  replaceAll(items, version) {
    this.items.clear();
    for (const item of items) {
      const uuid = item.uuid ?? item.item_uuid;
      if (uuid) this.items.set(uuid, { ...item, item_type: itemType(item) });
    }
    this.version = version;
    this.changed([...this.items.keys()], true);
  }

  /** A `command` from the server (or one of ours applied locally first). */
  apply({ action, item_type: type, item_id: uuid, data }) {
    if (!uuid) return;
    switch (action) {
      case 'add_item':
      case 'update_item':
        // The data is the item's whole current state (PROTOCOL §3.3).
        this.items.set(uuid, { ...data, item_type: type ?? itemType(data) });
        break;
      case 'move_item': {
        // Not sent by this server, but a command all the same: position and rotation only.
        const item = this.items.get(uuid);
        if (!item) return;
        for (const key of ['x_mm', 'y_mm', 'angle_deg']) {
          if (key in data) item[key] = data[key];
        }
        break;
      }
      case 'remove_item':
        this.items.delete(uuid);
        break;
      default:
        return;
    }
    this.changed([uuid]);
  }
}
