//! A y-websocket client for the socket suites: a yrs document and its `/yjs` connection. Ordering comes from the protocol, never from sleeps: the session answers a
//! SyncStep1 with SyncStep2 after everything it sent the connection before ([`YClient::sync`]).

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::awareness::AwarenessUpdate;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, MapRef, ReadTxn, Transact, TransactionMut};

use super::{recv, TestServer, Ws, PATIENCE};

pub struct YClient {
    pub ws: Ws,
    pub doc: Doc,
}

impl YClient {
    /// Opens the connection without any handshake.
    pub async fn connect_with(server: &TestServer, path: &str, doc: Doc) -> YClient {
        let ws = server.connect(path).await;
        super::items(&doc);
        YClient { ws, doc }
    }

    /// A client over a connection opened elsewhere (a child process, TLS), the handshake done.
    pub async fn over(ws: Ws) -> YClient {
        let doc = Doc::new();
        super::items(&doc);
        let mut client = YClient { ws, doc };
        client.handshake().await;
        client
    }

    /// Connects and runs the handshake; returns what came besides the sync messages.
    pub async fn join(server: &TestServer, path: &str) -> (YClient, Vec<Message>) {
        let mut client = YClient::connect_with(server, path, Doc::new()).await;
        let others = client.handshake().await;
        (client, others)
    }

    /// The next frame, decoded; panics on a text frame (`/yjs` sends none), a close or an
    /// undecodable frame.
    pub async fn recv(&mut self) -> Message {
        let msg = recv(&mut self.ws).await;
        let WsMessage::Binary(bytes) = msg else {
            panic!("/yjs sent a non-binary frame: {msg:?}");
        };
        Message::decode_v1(&bytes)
            .unwrap_or_else(|e| panic!("undecodable y-websocket frame {bytes:?}: {e}"))
    }

    pub async fn send(&mut self, msg: Message) {
        self.send_raw(msg.encode_v1()).await;
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws.send(WsMessage::binary(bytes)).await.unwrap();
    }

    /// The y-websocket handshake as a client does it: the server's SyncStep1 comes first and
    /// is answered with SyncStep2 (what the server lacks), then our SyncStep1 gets the
    /// server's SyncStep2. Returns the other messages that arrived meanwhile.
    pub async fn handshake(&mut self) -> Vec<Message> {
        let first = self.recv().await;
        let Message::Sync(SyncMessage::SyncStep1(sv)) = first else {
            panic!("the server's first frame must be its SyncStep1, got {first:?}");
        };
        let diff = self.doc.transact().encode_state_as_update_v1(&sv);
        self.send(Message::Sync(SyncMessage::SyncStep2(diff))).await;
        self.sync().await
    }

    /// Sends SyncStep1 and applies every update until the server's SyncStep2 (applied too).
    /// Returns the messages that came before the SyncStep2: everything the session had sent
    /// this connection before handling the SyncStep1.
    pub async fn sync(&mut self) -> Vec<Message> {
        let sv = self.doc.transact().state_vector();
        self.send(Message::Sync(SyncMessage::SyncStep1(sv))).await;
        let mut before = Vec::new();
        loop {
            match self.recv().await {
                Message::Sync(SyncMessage::SyncStep2(update)) => {
                    self.apply(&update);
                    return before;
                }
                Message::Sync(SyncMessage::Update(update)) => {
                    self.apply(&update);
                    before.push(Message::Sync(SyncMessage::Update(update)));
                }
                other => before.push(other),
            }
        }
    }

    pub fn apply(&self, update: &[u8]) {
        super::apply_update(&self.doc, update);
    }

    /// Makes a change in one transaction and sends it as a sync Update.
    pub async fn edit_and_send(&mut self, f: impl FnOnce(&mut TransactionMut, &MapRef)) {
        let update = super::edit(&self.doc, f);
        self.send(Message::Sync(SyncMessage::Update(update))).await;
    }

    /// The next awareness update (sync updates on the way are applied).
    pub async fn next_awareness(&mut self) -> AwarenessUpdate {
        loop {
            match self.recv().await {
                Message::Awareness(update) => return update,
                Message::Sync(SyncMessage::Update(update)) => self.apply(&update),
                other => panic!("expected an awareness update, got {other:?}"),
            }
        }
    }

    /// An item of the document as JSON.
    pub fn item(&self, uuid: &str) -> Option<Value> {
        super::doc_item(&self.doc, uuid)
    }

    /// Closes the connection and reads until the server's close frame and the end.
    pub async fn close(mut self) {
        self.ws.close(None).await.unwrap();
        while let Ok(Some(Ok(_))) = tokio::time::timeout(PATIENCE, self.ws.next()).await {}
    }
}
