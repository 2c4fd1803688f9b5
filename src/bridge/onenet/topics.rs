//! The device's topics, all under `$sys/{pid}/{dev}/`. OneNET disconnects a
//! device that publishes anywhere else, so every outgoing topic is built
//! here and checked with [`Topics::is_own`] before it is sent.

/// Topic names of one OneNET device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(product_id: &str, device_name: &str) -> Topics {
        Topics {
            prefix: format!("$sys/{product_id}/{device_name}/"),
        }
    }

    /// `$sys/{pid}/{dev}/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn at(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    pub fn property_post(&self) -> String {
        self.at("thing/property/post")
    }

    pub fn property_post_reply(&self) -> String {
        self.at("thing/property/post/reply")
    }

    pub fn property_set(&self) -> String {
        self.at("thing/property/set")
    }

    pub fn property_set_reply(&self) -> String {
        self.at("thing/property/set_reply")
    }

    pub fn history_post(&self) -> String {
        self.at("thing/history/post")
    }

    pub fn history_post_reply(&self) -> String {
        self.at("thing/history/post/reply")
    }

    pub fn property_get(&self) -> String {
        self.at("thing/property/get")
    }

    pub fn property_get_reply(&self) -> String {
        self.at("thing/property/get_reply")
    }

    pub fn pack_post(&self) -> String {
        self.at("thing/pack/post")
    }

    pub fn pack_post_reply(&self) -> String {
        self.at("thing/pack/post/reply")
    }

    pub fn sub_login(&self) -> String {
        self.at("thing/sub/login")
    }

    pub fn sub_login_reply(&self) -> String {
        self.at("thing/sub/login/reply")
    }

    pub fn topo_add(&self) -> String {
        self.at("thing/sub/topo/add")
    }

    pub fn topo_add_reply(&self) -> String {
        self.at("thing/sub/topo/add/reply")
    }

    pub fn dp_post(&self) -> String {
        self.at("dp/post/json")
    }

    pub fn dp_accepted(&self) -> String {
        self.at("dp/post/json/accepted")
    }

    pub fn dp_rejected(&self) -> String {
        self.at("dp/post/json/rejected")
    }

    /// Filter for commands: `cmd/request/+`.
    pub fn cmd_request_filter(&self) -> String {
        self.at("cmd/request/+")
    }

    pub fn cmd_request(&self, cmd_id: &str) -> String {
        self.at(&format!("cmd/request/{cmd_id}"))
    }

    pub fn cmd_response(&self, cmd_id: &str) -> String {
        self.at(&format!("cmd/response/{cmd_id}"))
    }

    /// The command id of a `cmd/request/{id}` topic.
    pub fn cmd_id<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("cmd/request/")
            .filter(|id| !id.is_empty() && !id.contains('/'))
    }

    /// Whether the device may publish on `topic`: below its prefix, with no
    /// wildcards and no empty level.
    pub fn is_own(&self, topic: &str) -> bool {
        match topic.strip_prefix(self.prefix.as_str()) {
            Some(rest) => {
                !rest.is_empty()
                    && !rest.contains(['+', '#'])
                    && rest.split('/').all(|level| !level.is_empty())
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_live_under_the_device_prefix() {
        let t = Topics::new("abc123", "gw-001");
        assert_eq!(t.prefix(), "$sys/abc123/gw-001/");
        assert_eq!(t.property_post(), "$sys/abc123/gw-001/thing/property/post");
        assert_eq!(
            t.property_set_reply(),
            "$sys/abc123/gw-001/thing/property/set_reply"
        );
        assert_eq!(t.dp_post(), "$sys/abc123/gw-001/dp/post/json");
        assert_eq!(t.cmd_response("c1"), "$sys/abc123/gw-001/cmd/response/c1");
        for own in [
            t.property_post(),
            t.property_set_reply(),
            t.cmd_response("x"),
        ] {
            assert!(t.is_own(&own), "{own}");
        }
        for foreign in [
            "PV/data",
            "$sys/abc123/other/thing/property/post",
            "$sys/abc123/gw-001/",
            "$sys/abc123/gw-001/thing/#",
            "$sys/abc123/gw-001//x",
        ] {
            assert!(!t.is_own(foreign), "{foreign}");
        }
    }

    #[test]
    fn command_ids_come_from_request_topics() {
        let t = Topics::new("p", "d");
        assert_eq!(t.cmd_id("$sys/p/d/cmd/request/abc-1"), Some("abc-1"));
        assert_eq!(t.cmd_id("$sys/p/d/cmd/request/"), None);
        assert_eq!(t.cmd_id("$sys/p/x/cmd/request/abc"), None);
        assert_eq!(t.cmd_id("$sys/p/d/cmd/response/abc"), None);
    }
}
