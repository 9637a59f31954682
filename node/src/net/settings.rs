//! The settings every member of a swarm must share. They are part of the
//! swarm's gossip topic, so peers whose settings differ never become members
//! of each other (they would average values that do not mean the same thing,
//! or shard data they do not hold alike), and a peer seen on the same swarm
//! with other settings is named with what differs.

use p2ptrain_protocol::averaging::Aggregation;
use p2ptrain_protocol::outer::OuterConfig;

/// A node's shared settings, in the order they appear in its topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSettings {
    /// `--model` (with `--stages` for a pipeline): what the values are.
    model: String,
    /// The training data's digest, shortened: what the shards index into.
    data: String,
    /// `--aggregation`: how each reducer combines its part.
    aggregation: String,
    /// `--compression`: the codec the swarm chose (a reducer takes top-k
    /// parts only in a top-k swarm; the dense codecs differ in error).
    compression: String,
    /// Plain parameter averaging, or DiLoCo with its outer optimizer (every
    /// member applies the averaged pseudo-gradient with its own).
    averaging: String,
}

/// Field names in the topic, with the flags a user changes to make them agree.
const FIELDS: [(&str, &str); 5] = [
    ("model", "--model"),
    ("data", "--data"),
    ("aggregation", "--aggregation"),
    ("compression", "--compression"),
    ("averaging", "--outer-lr/--outer-momentum"),
];

impl RunSettings {
    /// The settings of a node training `model` on data with digest `data`.
    pub fn new(
        model: &str,
        data: &[u8; 32],
        aggregation: Aggregation,
        compression: &str,
        outer: Option<OuterConfig>,
    ) -> Self {
        let data = data[..8].iter().map(|b| format!("{b:02x}")).collect();
        RunSettings {
            model: model.replace('/', "_"),
            data,
            aggregation: match aggregation {
                Aggregation::Mean => "mean".to_string(),
                Aggregation::TrimmedMean { trim } => format!("trimmed-mean:{trim}"),
                Aggregation::CenteredClip { radius } => format!("centered-clip:{radius}"),
            },
            compression: compression.replace('/', "_"),
            averaging: match outer {
                Some(o) => format!("diloco:{}:{}", o.lr, o.momentum),
                None => "plain".to_string(),
            },
        }
    }

    fn values(&self) -> [&str; 5] {
        [
            &self.model,
            &self.data,
            &self.aggregation,
            &self.compression,
            &self.averaging,
        ]
    }

    /// The settings as they end the gossip topic: `model=mlp/data=…/…`.
    pub fn tag(&self) -> String {
        FIELDS
            .iter()
            .zip(self.values())
            .map(|((name, _), value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Reads a [`RunSettings::tag`]; `None` if it is not one (another
    /// version's, or not ours at all).
    pub fn parse(tag: &str) -> Option<Self> {
        let mut values = tag.split('/').zip(FIELDS).map(|(field, (name, _))| {
            let (key, value) = field.split_once('=')?;
            (key == name).then(|| value.to_string())
        });
        let mut next = || values.next().flatten();
        let settings = RunSettings {
            model: next()?,
            data: next()?,
            aggregation: next()?,
            compression: next()?,
            averaging: next()?,
        };
        (tag.split('/').count() == FIELDS.len()).then_some(settings)
    }

    /// What differs between `theirs` and ours, one `flag: X there, Y here`
    /// per setting (empty if nothing does).
    pub fn differences(&self, theirs: &RunSettings) -> Vec<String> {
        FIELDS
            .iter()
            .zip(self.values().into_iter().zip(theirs.values()))
            .filter(|(_, (ours, theirs))| ours != theirs)
            .map(|((name, flag), (ours, theirs))| match *name {
                "data" => format!("{flag}: a data set with digest {theirs} there, {ours} here"),
                _ => format!("{flag}: {theirs} there, {ours} here"),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(model: &str, aggregation: Aggregation, outer: Option<OuterConfig>) -> RunSettings {
        RunSettings::new(model, &[7; 32], aggregation, "f32", outer)
    }

    #[test]
    fn a_tag_reads_back_as_the_same_settings() {
        let all = [
            settings("mlp", Aggregation::Mean, None),
            settings(
                "char-lm:2",
                Aggregation::TrimmedMean { trim: 0.2 },
                Some(OuterConfig {
                    lr: 0.7,
                    momentum: 0.9,
                }),
            ),
            RunSettings::new(
                "a/b",
                &[0; 32],
                Aggregation::CenteredClip { radius: 1.5 },
                "topk:0.01",
                None,
            ),
        ];
        for s in all {
            let tag = s.tag();
            assert_eq!(RunSettings::parse(&tag), Some(s.clone()), "{tag}");
            assert!(s.differences(&s).is_empty());
        }
        assert_eq!(
            settings("mlp", Aggregation::Mean, None).tag(),
            "model=mlp/data=0707070707070707/aggregation=mean/compression=f32/averaging=plain"
        );
    }

    #[test]
    fn what_is_not_a_tag_is_refused() {
        let tag = settings("mlp", Aggregation::Mean, None).tag();
        for bad in [
            "",
            "control/1",
            &tag[..tag.len() - 20],
            &format!("{tag}/extra=1"),
            &tag.replace("model=", "modle="),
            &tag.replace("model=mlp", "model"),
        ] {
            assert_eq!(RunSettings::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn differences_name_the_flags_to_change() {
        let ours = settings("mlp", Aggregation::Mean, None);
        let diloco = settings(
            "mlp",
            Aggregation::Mean,
            Some(OuterConfig {
                lr: 0.7,
                momentum: 0.9,
            }),
        );
        assert_eq!(
            ours.differences(&diloco),
            vec!["--outer-lr/--outer-momentum: diloco:0.7:0.9 there, plain here"]
        );
        let other = RunSettings::new("cnn", &[8; 32], Aggregation::Mean, "int8", None);
        let said = ours.differences(&other);
        assert_eq!(said.len(), 3, "{said:?}");
        assert_eq!(said[0], "--model: cnn there, mlp here");
        assert!(
            said[1].starts_with("--data: a data set with digest 0808"),
            "{said:?}"
        );
        assert_eq!(said[2], "--compression: int8 there, f32 here");
    }
}
